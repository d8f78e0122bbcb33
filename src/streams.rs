//! The streams a gateway serves, each a whole ingestion path of its own: its configuration,
//! its [`Pipeline`] (schema, coalescers, ClickHouse nodes with their writers and journals,
//! idempotency namespace) and its shed verdict. The fronts look a stream up by name and hand
//! it a request; nothing below this point knows other streams exist, which is what keeps a
//! saturated or broken stream from holding up the others.

use std::sync::Arc;

use crate::config::{Config, StreamName};
use crate::ingest::Pipeline;
use crate::shed::{Policy, ShedState};

/// One stream, running.
#[derive(Debug)]
pub struct Stream {
    pub name: StreamName,
    pub config: Arc<Config>,
    pub ingest: Arc<Pipeline>,
    /// The verdict the request path reads (on a cluster, the summary over the nodes).
    pub shed: Arc<ShedState>,
    /// How the verdict is acted on, built once from the stream's configuration.
    pub policy: Policy,
}

impl Stream {
    /// `Ok` when this stream takes events, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        self.ingest.health().readiness(self.ingest.schema().is_some())?;
        if self.ingest.journal_failed() {
            return Err("the journal cannot write (its disk is full or failing)");
        }
        Ok(())
    }
}

/// Every stream, `default` first.
#[derive(Debug)]
pub struct Streams {
    streams: Vec<Arc<Stream>>,
}

impl Streams {
    /// `streams` must start with the default stream.
    pub fn new(streams: Vec<Arc<Stream>>) -> Self {
        debug_assert!(streams.first().is_some_and(|s| s.name.is_default()));
        Self { streams }
    }

    /// The stream of the top-level keys, which `/v1/events` writes to.
    pub fn default_stream(&self) -> &Arc<Stream> {
        &self.streams[0]
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Stream>> {
        self.streams.iter().find(|s| s.name.as_str() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Stream>> {
        self.streams.iter()
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Marks every stream as shutting down.
    pub fn start_stopping(&self) {
        for stream in &self.streams {
            stream.ingest.health().start_stopping();
        }
    }

    /// Whether the gateway should get traffic: while any stream takes events. A stream whose
    /// table is missing or whose Buffer is saturated answers 503 itself; taking every gateway
    /// out of the load balancer for it would stop the other streams too, and every gateway has
    /// the same streams. With one stream this is that stream's readiness.
    pub fn readiness(&self) -> Result<(), &'static str> {
        let mut why = Ok(());
        for stream in &self.streams {
            match stream.readiness() {
                Ok(()) => return Ok(()),
                Err(reason) if why.is_ok() => why = Err(reason),
                Err(_) => {}
            }
        }
        why
    }
}
