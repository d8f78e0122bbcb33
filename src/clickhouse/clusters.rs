//! Reading a cluster's definition from the servers (`system.clusters`), for
//! [`Topology::with_cluster`](crate::config::Topology::with_cluster).

use super::{ClickHouse, ClickHouseError, quote_str};
use crate::config::ClusterRow;

impl ClickHouse {
    /// The shards and replicas of `cluster` as the server defines it, in order.
    pub async fn cluster_rows(&self, cluster: &str) -> Result<Vec<ClusterRow>, ClickHouseError> {
        #[derive(serde::Deserialize)]
        struct Row {
            shard_num: String,
            shard_weight: String,
            host_name: String,
        }
        let sql = format!(
            "SELECT toString(shard_num) AS shard_num, toString(shard_weight) AS shard_weight, host_name \
             FROM system.clusters WHERE cluster = {} ORDER BY shard_num, replica_num",
            quote_str(cluster)
        );
        let number = |text: &str| text.parse::<u64>().map_err(|_| ClickHouseError::Protocol(format!("{text:?}")));
        self.fetch_json::<Row>(&sql)
            .await?
            .into_iter()
            .map(|r| {
                Ok(ClusterRow {
                    shard_num: number(&r.shard_num)?,
                    shard_weight: number(&r.shard_weight)?,
                    host_name: r.host_name,
                })
            })
            .collect()
    }
}
