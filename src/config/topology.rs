//! The ClickHouse servers the gateway writes to: one node, or a cluster of shards, each with
//! one or more replicas.
//!
//! `clickhouse_url` lists them: shards separated by `;`, the replicas of a shard by `,`
//! (`http://a1:8123,http://a2:8123;http://b1:8123`). With `clickhouse_cluster` set, the
//! cluster's definition in the servers' `remote_servers` (`system.clusters`) gives the shards'
//! weights, and must agree with the list; given a single URL, the list itself is derived from
//! it: each replica's `host_name` with the seed URL's scheme and HTTP port (`system.clusters`
//! has only the native TCP port).
//!
//! Pure parsing, here beside the key it parses: the gateway, `migrate`, `check` and `drain`
//! resolve it against the servers through `crate::clickhouse::fleet`.

/// One shard: its weight (rows a Distributed table sends it, relative to the others) and its
/// replicas' URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub weight: u64,
    pub replicas: Vec<String>,
}

/// Shards in the cluster's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub shards: Vec<ShardSpec>,
}

impl Topology {
    /// Parses `clickhouse_url`; every shard weighs 1 until the cluster says otherwise.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut shards = Vec::new();
        for shard in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let replicas: Vec<String> =
                shard.split(',').map(str::trim).filter(|r| !r.is_empty()).map(String::from).collect();
            if let Some(bad) = replicas.iter().find(|r| !r.starts_with("http://") && !r.starts_with("https://")) {
                return Err(format!("{bad:?} must start with http:// or https://"));
            }
            shards.push(ShardSpec { weight: 1, replicas });
        }
        if shards.is_empty() {
            return Err("must name at least one server".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = shards.iter().flat_map(|s| &s.replicas).find(|r| !seen.insert(r.as_str())) {
            return Err(format!("{twice} is listed twice"));
        }
        Ok(Self { shards })
    }

    /// The first server listed: where the schema is read and single-node statements go.
    pub fn first(&self) -> &str {
        &self.shards[0].replicas[0]
    }

    pub fn nodes(&self) -> usize {
        self.shards.iter().map(|s| s.replicas.len()).sum()
    }

    /// Every node as (shard, replica, URL).
    pub fn each(&self) -> impl Iterator<Item = (usize, usize, &str)> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(s, shard)| shard.replicas.iter().enumerate().map(move |(r, url)| (s, r, url.as_str())))
    }

    pub fn weights(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.weight).collect()
    }

    /// The topology after reading `cluster` from `system.clusters` on `seed`: the weights
    /// taken, the shard count checked; a single URL expanded into the cluster's nodes.
    pub fn with_cluster(self, rows: &[ClusterRow]) -> Result<Self, String> {
        let mut shards: Vec<(u64, u64, Vec<String>)> = Vec::new();
        for row in rows {
            match shards.last_mut() {
                Some((num, _, hosts)) if *num == row.shard_num => hosts.push(row.host_name.clone()),
                _ => shards.push((row.shard_num, row.shard_weight, vec![row.host_name.clone()])),
            }
        }
        if shards.is_empty() {
            return Err("the cluster is not in system.clusters".into());
        }
        if self.nodes() == 1 && shards.len() + shards[0].2.len() > 2 {
            let seed = self.first();
            let shards: Vec<ShardSpec> = shards
                .into_iter()
                .map(|(_, weight, hosts)| ShardSpec {
                    weight,
                    replicas: hosts.iter().map(|host| with_host(seed, host)).collect(),
                })
                .collect();
            let mut seen = std::collections::HashSet::new();
            if let Some(twice) = shards.iter().flat_map(|s| &s.replicas).find(|r| !seen.insert(r.as_str())) {
                return Err(format!(
                    "the cluster's nodes share a host ({twice}): their HTTP ports cannot be derived; list them in clickhouse_url"
                ));
            }
            return Ok(Self { shards });
        }
        if shards.len() != self.shards.len() {
            return Err(format!("clickhouse_url lists {} shards, the cluster has {}", self.shards.len(), shards.len()));
        }
        let shards =
            self.shards.into_iter().zip(shards).map(|(spec, (_, weight, _))| ShardSpec { weight, ..spec }).collect();
        Ok(Self { shards })
    }
}

/// `url` as it may be shown (metric labels, logs, `/v1/status`, `check`): without the
/// `user:password@` it may carry.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{host}{}", &rest[authority_end..]),
        None => url.to_string(),
    }
}

/// `seed` with its host replaced by `host` (scheme, port and path kept).
fn with_host(seed: &str, host: &str) -> String {
    let (scheme, rest) = seed.split_once("://").unwrap_or(("http", seed));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let hostless = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = hostless.rsplit_once(':').map(|(_, p)| p).filter(|p| p.chars().all(|c| c.is_ascii_digit()));
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// A row of `system.clusters`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClusterRow {
    pub shard_num: u64,
    pub shard_weight: u64,
    pub host_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(shard_num: u64, shard_weight: u64, host: &str) -> ClusterRow {
        ClusterRow { shard_num, shard_weight, host_name: host.into() }
    }

    #[test]
    fn shown_urls_carry_no_credentials() {
        assert_eq!(redacted("https://user:p%40ss@ch1:8443/db"), "https://ch1:8443/db");
        assert_eq!(redacted("http://ch1:8123"), "http://ch1:8123");
        assert_eq!(redacted("redis://:secret@r1:6379/0"), "redis://r1:6379/0");
        assert_eq!(redacted("http://h/path@x"), "http://h/path@x", "an @ after the host is not userinfo");
    }

    #[test]
    fn shards_by_semicolon_replicas_by_comma() {
        let t = Topology::parse("http://a1:8123, http://a2:8123 ;http://b1:8123").unwrap();
        assert_eq!(t.shards.len(), 2);
        assert_eq!(t.shards[0].replicas, ["http://a1:8123", "http://a2:8123"]);
        assert_eq!((t.nodes(), t.first()), (3, "http://a1:8123"));
        assert_eq!(t.each().map(|(s, r, _)| (s, r)).collect::<Vec<_>>(), [(0, 0), (0, 1), (1, 0)]);
        assert_eq!(Topology::parse("http://one:8123").unwrap().nodes(), 1, "one URL stays one node");
        assert!(Topology::parse("a1:8123").is_err());
        assert!(Topology::parse(" ; ").is_err());
        assert!(Topology::parse("http://a:1;http://a:1").is_err(), "a node listed twice");
    }

    #[test]
    fn the_cluster_gives_weights_or_the_whole_list() {
        let rows = [row(1, 1, "a1"), row(1, 1, "a2"), row(2, 3, "b1")];
        let listed = Topology::parse("http://x:1,http://y:1;http://z:1").unwrap().with_cluster(&rows).unwrap();
        assert_eq!(listed.weights(), [1, 3]);
        assert_eq!(listed.shards[1].replicas, ["http://z:1"], "listed URLs are kept");
        let derived = Topology::parse("https://u:p@seed:8443/").unwrap().with_cluster(&rows).unwrap();
        assert_eq!(derived.shards[0].replicas, ["https://a1:8443/", "https://a2:8443/"]);
        assert_eq!(derived.shards[1].replicas, ["https://b1:8443/"]);
        let wrong = Topology::parse("http://x:1;http://y:1;http://z:1").unwrap().with_cluster(&rows);
        assert!(wrong.unwrap_err().contains("3 shards"));
        assert!(Topology::parse("http://x:1").unwrap().with_cluster(&[]).is_err());
        let one_host = [row(1, 1, "h"), row(2, 1, "h")];
        assert!(Topology::parse("http://h:1").unwrap().with_cluster(&one_host).unwrap_err().contains("share a host"));
    }
}
