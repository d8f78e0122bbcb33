//! Fallback mode while the Buffer is saturated: a request's rows go straight into the fallback
//! MergeTree table, one INSERT per column list, bypassing the coalescers.

use super::{Ingest, IngestError};
use crate::idempotency::Reservation;
use crate::rows::{Groups, PartitionRows};
use crate::schema::{TableSchema, quote_ident};

impl Ingest {
    pub(super) async fn write_fallback(
        &self,
        schema: &TableSchema,
        partitions: Vec<PartitionRows>,
        reservations: Vec<Option<Reservation>>,
    ) -> Result<(), IngestError> {
        let table = format!("{}.{}", quote_ident(&self.config.database), quote_ident(&self.config.fallback_table));
        let mut groups = Groups::default();
        for chunk in partitions.into_iter().flat_map(|p| p.chunks) {
            groups.add(chunk);
        }
        let mut result = Ok(());
        for group in groups.0 {
            result = self.writer.write_rows(schema, &table, group, None).await;
            if result.is_err() {
                break;
            }
        }
        let reservations: Vec<Reservation> = reservations.into_iter().flatten().collect();
        match result {
            Ok(()) => {
                let _ = self.idempotency.commit_with_retries(&reservations).await;
                Ok(())
            }
            Err(error) => {
                let _ = self.idempotency.release(&reservations).await;
                Err(IngestError::FlushFailed(error.to_string()))
            }
        }
    }
}
