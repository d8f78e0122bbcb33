//! The Kafka clients' configuration: the gateway's own settings, then the librdkafka
//! properties passed through (`kafka_properties`, `kafka_properties_file`: TLS, SASL,
//! timeouts), except those the offset protocol depends on.

use rdkafka::ClientConfig;

use super::KafkaError;
use crate::config::Config;

/// Properties an operator may not override: the consumer commits offsets itself, and only
/// after the rows are safe; automatic commits or offset stores would commit before.
const PROTECTED: [&str; 4] = ["enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"];

/// `key=value` lines; blank lines and `#` comments are skipped.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, KafkaError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else {
            return Err(KafkaError::Config(format!("kafka property `{line}` is not key=value")));
        };
        let key = key.trim();
        if PROTECTED.contains(&key) {
            return Err(KafkaError::Config(format!(
                "kafka property {key} is set by buffergate and cannot be overridden"
            )));
        }
        out.push((key.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

/// The pass-through properties of the configuration and of its file.
pub fn properties(config: &Config) -> Result<Vec<(String, String)>, KafkaError> {
    let mut props = parse_properties(&config.kafka.kafka_properties)?;
    if !config.kafka.kafka_properties_file.is_empty() {
        let text = std::fs::read_to_string(&config.kafka.kafka_properties_file)
            .map_err(|e| KafkaError::Config(format!("{}: {e}", config.kafka.kafka_properties_file)))?;
        props.extend(parse_properties(&text)?);
    }
    Ok(props)
}

fn common(config: &Config) -> Result<ClientConfig, KafkaError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", config.kafka.kafka_brokers.trim()).set("client.id", "buffergate");
    for (key, value) in properties(config)? {
        client.set(key, value);
    }
    Ok(client)
}

/// The group member's configuration.
pub fn consumer(config: &Config) -> Result<ClientConfig, KafkaError> {
    let mut client = common(config)?;
    // A group with no committed offset starts at the beginning, so nothing is skipped; the
    // operator may choose otherwise.
    for (key, value) in [("auto.offset.reset", "earliest"), ("enable.partition.eof", "false")] {
        if client.get(key).is_none() {
            client.set(key, value);
        }
    }
    // Offsets are committed by the consumer, per partition, once the rows are safe.
    client
        .set("group.id", config.kafka.kafka_group.trim())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    Ok(client)
}

/// The dead-letter producer's configuration: idempotent, acknowledged by every in-sync replica.
pub fn producer(config: &Config) -> Result<ClientConfig, KafkaError> {
    let mut client = common(config)?;
    client.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5");
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_pass_through_except_the_protocol() {
        let props = parse_properties("# TLS\nsecurity.protocol = SASL_SSL\n\nsasl.password=a=b\n").unwrap();
        assert_eq!(props[0], ("security.protocol".into(), "SASL_SSL".into()));
        assert_eq!(props[1], ("sasl.password".into(), "a=b".into()), "only the first = splits");
        assert!(parse_properties("enable.auto.commit=true").is_err());
        assert!(parse_properties("no equals sign").is_err());
    }

    #[test]
    fn the_consumer_commits_itself() {
        let config = {
            let mut config = Config::default();
            config.kafka.kafka_brokers = "b1:9092,b2:9092".into();
            config.kafka.kafka_properties = "auto.offset.reset=latest\nsession.timeout.ms=6000".into();
            config
        };
        let client = consumer(&config).unwrap();
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("auto.offset.reset"), Some("latest"), "the operator's choice");
        assert_eq!(client.get("session.timeout.ms"), Some("6000"));
        assert_eq!(client.get("group.id"), Some("buffergate"));
        assert_eq!(producer(&config).unwrap().get("enable.idempotence"), Some("true"));
    }
}
