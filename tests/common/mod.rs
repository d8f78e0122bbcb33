//! Test harness: real ClickHouse (one server, or in `cluster` a sharded, replicated cluster), Redis
//! and Redis Cluster processes on free ports with temporary data directories, stopped by pid; a
//! gateway started in-process on port 0; helpers to post as a producer and to read back what
//! ClickHouse stored.
#![allow(dead_code, unsafe_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use buffergate::Config;
use buffergate::Shutdown;
use serde_json::Value;

/// A child process killed (SIGKILL) when dropped, and by the kernel if the test binary dies.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    exit: std::sync::Mutex<mpsc::Receiver<std::process::ExitStatus>>,
}

impl Process {
    /// Spawns `command` from a keeper thread that lives as long as the child: the child gets
    /// PR_SET_PDEATHSIG tied to that thread, so a crashed or aborted test run leaves nothing.
    pub fn spawn(mut command: Command, log: &Path) -> Process {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let (tx, rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            match command.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id() as i32));
                    if let Ok(status) = child.wait() {
                        let _ = exit_tx.send(status);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let pid = rx.recv().expect("keeper thread").expect("spawn");
        Process { pid, exit: std::sync::Mutex::new(exit_rx) }
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.exit.lock().expect("exit lock").recv_timeout(timeout).ok()
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid, signal);
        }
    }

    pub fn is_alive(&self) -> bool {
        unsafe { libc::kill(self.pid, 0) == 0 }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// A port no process listens on, chosen below the kernel's ephemeral range. A port from that
/// range (what binding port 0 gives) can be taken, between this call and the server's bind, by
/// any outgoing connection's source port, or by a polling client's connect to itself; a server
/// that then fails to bind is a flaky test. Ports are handed out in turn from an offset derived
/// from the process id, so two test binaries rarely probe the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32768);
    let (low, span) = (ephemeral_low / 2, ephemeral_low - ephemeral_low / 2);
    let _ = NEXT.compare_exchange(usize::MAX, std::process::id() as usize * 97, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = u16::try_from(low + NEXT.fetch_add(1, Ordering::Relaxed) % span).expect("port below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{ephemeral_low}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory for this test binary's servers, under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Removes scratch directories left by test runs whose process is gone.
fn sweep_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A private clickhouse-server.
#[derive(Debug)]
pub struct ClickHouseServer {
    pub url: String,
    pub http_port: u16,
    tcp_port: u16,
    pub dir: PathBuf,
    /// Merged over the generated configuration on every start: a cluster node's part.
    extra_config: Option<PathBuf>,
    /// How long after a kill a restart waits: a cluster node's ZooKeeper session outlives it.
    restart_grace: Duration,
    killed_at: std::sync::Mutex<Option<Instant>>,
    process: std::sync::Mutex<Process>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl ClickHouseServer {
    pub fn start(name: &str) -> ClickHouseServer {
        sweep_stale_scratch();
        let dir = scratch(name);
        for _attempt in 0..3 {
            if let Some(server) = ClickHouseServer::launch(&dir, free_port(), free_port(), None) {
                return server;
            }
        }
        panic!("clickhouse-server did not start; see {}", dir.display());
    }

    /// Starts a server on these ports and data directory, with `extra_config` (a file for
    /// config.d) if given; `None` if it did not come up.
    pub fn launch(
        dir: &Path,
        http_port: u16,
        tcp_port: u16,
        extra_config: Option<PathBuf>,
    ) -> Option<ClickHouseServer> {
        let process = spawn_clickhouse(dir, http_port, tcp_port, extra_config.as_deref(), "stdout.log");
        let url = format!("http://127.0.0.1:{http_port}");
        let up = wait_http(&format!("{url}/ping"), Duration::from_secs(60), &process);
        let process = std::sync::Mutex::new(process);
        up.then(|| ClickHouseServer {
            url,
            http_port,
            tcp_port,
            dir: dir.to_path_buf(),
            extra_config,
            restart_grace: Duration::ZERO,
            killed_at: std::sync::Mutex::new(None),
            process,
        })
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Stops the server (SIGKILL, as a crash would) and waits until it is gone.
    pub fn kill(&self) {
        let process = self.process.lock().unwrap();
        process.signal(libc::SIGKILL);
        process.wait_exit(Duration::from_secs(10));
        *self.killed_at.lock().unwrap() = Some(Instant::now());
    }

    /// Sends `signal` to the server (SIGSTOP / SIGCONT to freeze and thaw it).
    pub fn signal(&self, signal: i32) {
        self.process.lock().unwrap().signal(signal);
    }

    /// Starts the server again on the same ports, data directory and configuration; a cluster
    /// node killed moments ago first waits for its restart grace to pass.
    pub fn restart(&self) {
        if let Some(killed_at) = self.killed_at.lock().unwrap().take() {
            std::thread::sleep(self.restart_grace.saturating_sub(killed_at.elapsed()));
        }
        let extra = self.extra_config.as_deref();
        let process = spawn_clickhouse(&self.dir, self.http_port, self.tcp_port, extra, "stdout-restarted.log");
        assert!(wait_http(&format!("{}/ping", self.url), Duration::from_secs(60), &process), "ClickHouse restarts");
        *self.process.lock().unwrap() = process;
    }

    /// A database name no other test uses.
    pub fn fresh_database(&self, prefix: &str) -> String {
        format!("{prefix}_{}", COUNTER.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs a statement; panics with ClickHouse's message on failure.
    pub async fn exec(&self, sql: &str) {
        if let Err(e) = self.try_exec(sql).await {
            panic!("{sql}\n→ {e}");
        }
    }

    /// Runs a statement (LowCardinality allowed, as 18.16 needs); returns ClickHouse's error.
    pub async fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.try_exec_with(sql, &[]).await
    }

    /// `try_exec` with query-level settings (sent as URL parameters, where every statement,
    /// DDL included, takes them).
    pub async fn try_exec_with(&self, sql: &str, settings: &[(&str, &str)]) -> Result<(), String> {
        let url = format!("{}/?allow_experimental_low_cardinality_type=1", self.url);
        let request = http().post(url).query(settings).body(sql.to_string());
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{status}: {}", response.text().await.unwrap_or_default()))
        }
    }

    /// Rows of a query as JSON objects (64-bit integers come back as strings on 18.16).
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        let response =
            http().post(&self.url).body(format!("{sql} FORMAT JSONEachRow")).send().await.expect("ClickHouse answers");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{sql}\n→ {status}: {text}");
        text.lines().map(|l| serde_json::from_str(l).expect("JSONEachRow")).collect()
    }

    pub async fn count(&self, table: &str) -> u64 {
        let rows = self.rows(&format!("SELECT count() AS c FROM {table}")).await;
        let c = &rows[0]["c"];
        c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())).expect("count")
    }
}

/// A private redis-server (no persistence), restartable on the same port.
#[derive(Debug)]
pub struct RedisServer {
    pub url: String,
    port: u16,
    dir: PathBuf,
    process: std::sync::Mutex<Option<Process>>,
}

impl RedisServer {
    pub fn start(name: &str) -> RedisServer {
        let dir = scratch(name);
        let port = free_port();
        let server =
            RedisServer { url: format!("redis://127.0.0.1:{port}/0"), port, dir, process: std::sync::Mutex::new(None) };
        server.restart();
        server
    }

    pub fn restart(&self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir);
        let process = Process::spawn(cmd, &self.dir.join("redis.log"));
        wait_port(self.port, &process);
        *self.process.lock().unwrap() = Some(process);
    }

    pub fn kill(&self) {
        if let Some(process) = self.process.lock().unwrap().take() {
            process.signal(libc::SIGKILL);
            process.wait_exit(Duration::from_secs(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// `redis-cli -p port args…`: its output, trimmed.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A private Redis Cluster: `primaries` primaries with `replicas` replicas each, every node a
/// redis-server of its own (no persistence) on a free port, stopped by pid.
#[derive(Debug)]
pub struct RedisCluster {
    /// `redis+cluster://` with every node as a seed.
    pub url: String,
    pub ports: Vec<u16>,
    /// Each node's cluster bus port, kept across its restarts.
    bus_ports: Vec<u16>,
    nodes: Vec<std::sync::Mutex<Option<Process>>>,
    dir: PathBuf,
}

/// One cluster node on `port` with its bus on `bus_port`, its files under `dir/<port>`.
fn start_node(dir: &Path, port: u16, bus_port: u16) -> Process {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("node dir");
    let mut cmd = Command::new("redis-server");
    // Quick failure detection, and a replica always allowed to take over.
    cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
        .args(["--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0"])
        .arg("--cluster-config-file")
        .arg(node_dir.join("nodes.conf"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        // The cluster bus port, otherwise port + 10000: that lands in the kernel's ephemeral
        // range, where an outgoing connection's source port can hold it first.
        .args(["--cluster-port", &bus_port.to_string()])
        .arg("--dir")
        .arg(&node_dir);
    let process = Process::spawn(cmd, &node_dir.join(format!("redis-{}.log", std::process::id())));
    wait_port(port, &process);
    process
}

impl RedisCluster {
    pub fn start(name: &str, primaries: usize, replicas: usize) -> RedisCluster {
        let dir = scratch(name);
        let count = primaries * (1 + replicas);
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let bus_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .zip(&bus_ports)
            .map(|(&p, &bus)| std::sync::Mutex::new(Some(start_node(&dir, p, bus))))
            .collect();
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(created.status.success(), "cluster create: {}", String::from_utf8_lossy(&created.stdout));
        let url = format!("redis+cluster://{}", addresses.join(","));
        let cluster = RedisCluster { url, ports, bus_ports, nodes, dir };
        cluster.wait_healthy(primaries, replicas);
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and every primary has its replicas
    /// connected.
    pub fn wait_healthy(&self, primaries: usize, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let live: Vec<u16> = self.live_ports();
            let ok = live.iter().all(|&p| redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok"));
            let primary_ports = self.primaries();
            let replicated = primary_ports.len() == primaries
                && primary_ports
                    .iter()
                    .all(|&p| redis_cli(p, &["info", "replication"]).contains(&format!("connected_slaves:{replicas}")));
            if ok && replicated {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports.iter().zip(&self.nodes).filter(|(_, n)| n.lock().unwrap().is_some()).map(|(p, _)| *p).collect()
    }

    /// Ports of the live primaries that serve slots, as the cluster reports them now.
    pub fn primaries(&self) -> Vec<u16> {
        let live = self.live_ports();
        let Some(&any) = live.first() else { return Vec::new() };
        redis_cli(any, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| l.split(' ').nth(1)?.split('@').next()?.rsplit(':').next()?.parse().ok())
            .filter(|p| live.contains(p))
            .collect()
    }

    /// The primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.live_ports()[0], &["cluster", "keyslot", key]).parse().expect("slot");
        let nodes = redis_cli(self.live_ports()[0], &["cluster", "nodes"]);
        for line in nodes.lines().filter(|l| l.contains("master") && !l.contains("fail")) {
            let fields: Vec<&str> = line.split(' ').collect();
            let serves = fields.iter().skip(8).any(|range| match range.split_once('-') {
                Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b),
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                return fields[1].split('@').next().unwrap().rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// Starts the node on `port` again, with its cluster configuration: a killed primary whose
    /// replica took over comes back as that replica's replica.
    pub fn restart(&self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node of this cluster");
        *self.nodes[i].lock().unwrap() = Some(start_node(&self.dir, port, self.bus_ports[i]));
    }

    /// SIGKILLs the node on `port` and waits until it is gone.
    pub fn kill(&self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node of this cluster");
        if let Some(process) = self.nodes[i].lock().unwrap().take() {
            process.signal(libc::SIGKILL);
            process.wait_exit(Duration::from_secs(10));
        }
    }
}

fn wait_port(port: u16, process: &Process) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline && process.is_alive(), "redis-server did not start on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `scripts/clickhouse-server.sh` for `dir` and these ports, its output in the file `log` in `dir`.
fn spawn_clickhouse(dir: &Path, http_port: u16, tcp_port: u16, extra_config: Option<&Path>, log: &str) -> Process {
    let mut cmd = Command::new(repo().join("scripts/clickhouse-server.sh"));
    cmd.arg(dir).arg(http_port.to_string()).arg(tcp_port.to_string());
    if let Some(extra) = extra_config {
        cmd.arg(extra);
    }
    std::fs::create_dir_all(dir).expect("server dir");
    Process::spawn(cmd, &dir.join(log))
}

/// The ClickHouse server shared by all tests of this binary.
pub fn clickhouse() -> &'static ClickHouseServer {
    static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
    SERVER.get_or_init(|| ClickHouseServer::start("clickhouse"))
}

fn wait_http(url: &str, timeout: Duration, process: &Process) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process.is_alive() {
            return false;
        }
        if let Ok(mut stream) =
            std::net::TcpStream::connect(url.trim_start_matches("http://").split('/').next().unwrap_or_default())
        {
            use std::io::{Read, Write};
            let path = url.splitn(4, '/').nth(3).unwrap_or_default();
            let _ = write!(stream, "GET /{path} HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A fresh HTTP client. Never shared between tests: each `#[tokio::test]` has its own runtime,
/// and a pooled connection opened on a runtime that has since shut down fails the next request
/// sent on it ("error sending request"). Idle connections are also dropped well before
/// ClickHouse's keep_alive_timeout (10 s here), so no request goes out on a closing connection.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .expect("client")
}

/// A configuration pointing at `ch`, database `db`, tuned for quick tests.
pub fn config(ch: &ClickHouseServer, db: &str) -> Config {
    let mut config = Config::default();
    config.clickhouse.clickhouse_url = ch.url.clone();
    config.table.database = db.to_string();
    config.batching.partitions = 2;
    config.clickhouse.schema_refresh_interval_ms = 300;
    config.clickhouse.retry_initial_backoff_ms = 50;
    config.clickhouse.retry_max_backoff_ms = 200;
    config
}

/// `config` with a Buffer that keeps its rows in memory (one layer, thresholds of an hour and
/// gigabytes) and a shed poll that tolerates a server stopped for a minute: for tests that
/// kill ClickHouse with rows in the Buffer, or fill it.
pub fn holding_buffer(mut config: Config) -> Config {
    config.table.buffer_num_layers = 1;
    config.table.buffer_min_time = 3600;
    config.table.buffer_max_time = 3600;
    config.table.buffer_min_rows = 100_000_000;
    config.table.buffer_max_rows = 1_000_000_000;
    config.table.buffer_min_bytes = 1_000_000_000;
    config.table.buffer_max_bytes = 2_000_000_000;
    config.shed.shed_stale_after_ms = 60_000;
    config
}

/// `config` for `db` with a Buffer of 1 MB that flushes only when full (an hour, 100 M rows),
/// polled every 100 ms: a few hundred 1 KB events saturate it.
pub fn small_buffer(ch: &ClickHouseServer, db: &str) -> Config {
    let mut config = config(ch, db);
    config.table.buffer_num_layers = 1;
    config.table.buffer_min_time = 3600;
    config.table.buffer_max_time = 3600;
    config.table.buffer_min_rows = 10_000_000;
    config.table.buffer_max_rows = 100_000_000;
    config.table.buffer_min_bytes = 500_000;
    config.table.buffer_max_bytes = 1_000_000;
    config.batching.flush_max_bytes = 200_000;
    config.shed.shed_poll_interval_ms = 100;
    config
}

/// `config` with a data directory of its own when it has the default one: gateways of a test
/// run never share a journal unless a test means them to.
pub fn own_data_dir(mut config: Config) -> Config {
    if config.journal.data_dir == buffergate::config::DEFAULT_DATA_DIR {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        config.journal.data_dir = scratch(&format!("gateway-data-{n}")).display().to_string();
    }
    config
}

/// The `buffergate` binary with `config` passed as `BUFFERGATE_*` variables.
pub fn command(config: &Config, args: &[&str]) -> Command {
    let config = &own_data_dir(config.clone());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buffergate"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("RUST_LOG", "info");
    let Value::Object(map) = serde_json::to_value(config).expect("config") else { unreachable!() };
    for (key, value) in map {
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        cmd.env(format!("BUFFERGATE_{}", key.to_ascii_uppercase()), text);
    }
    // Streams are tables of the file: written to one beside the data directory.
    if !config.streams.is_empty() {
        let mut toml = String::new();
        for (name, stream) in &config.streams {
            toml.push_str(&format!("[streams.{name}]\n"));
            let Value::Object(keys) = serde_json::to_value(stream).expect("stream") else { unreachable!() };
            for (key, value) in keys {
                toml.push_str(&format!("{key} = {value}\n"));
            }
        }
        let file = Path::new(&config.journal.data_dir).with_extension("streams.toml");
        std::fs::write(&file, toml).expect("streams file");
        cmd.arg("--config").arg(file);
    }
    cmd
}

/// Runs `buffergate migrate` for `config` (in-process).
pub async fn migrate(config: &Config) {
    let ch = buffergate::clickhouse::ClickHouse::new(config);
    buffergate::clickhouse::migrate::migrate(&ch, config).await.expect("migrate");
}

/// A gateway running in this process on a free port.
#[derive(Debug)]
pub struct Gateway {
    pub url: String,
    pub config: Config,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), buffergate::server::ServeError>>,
}

impl Gateway {
    pub async fn start(config: Config) -> Gateway {
        let config = own_data_dir(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = Shutdown::new();
        let task = tokio::spawn(buffergate::server::run(config.clone(), listener, shutdown.clone()));
        Gateway { url, config, shutdown, task }
    }

    /// Waits until `/readyz` answers 200 (schema loaded, table present).
    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.url);
        eventually(Duration::from_secs(20), "the gateway to be ready", || {
            let url = url.clone();
            async move { http().get(url).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
    }

    /// Triggers shutdown and waits for the drain to finish.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("gateway task").expect("gateway ran");
    }

    /// POSTs a JSON body to /v1/events; returns status and JSON answer.
    pub async fn post_json(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/events", "application/json", None, body.to_string().into_bytes()).await
    }

    pub async fn post(&self, path: &str, content_type: &str, encoding: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut request = http().post(format!("{}{path}", self.url)).header("content-type", content_type).body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Flushes the Buffer into the destination so the rows can be read back.
    pub async fn drain(&self, ch: &ClickHouseServer) {
        ch.exec(&format!("OPTIMIZE TABLE `{}`.`{}`", self.config.table.database, self.config.table.buffer_table)).await;
    }

    /// `GET /v1/status` with the gateway's admin token.
    pub async fn status(&self) -> Value {
        let response = http().get(format!("{}/v1/status", self.url)).bearer_auth(&self.config.auth.admin_token).send();
        response.await.expect("gateway answers").json().await.unwrap_or(Value::Null)
    }

    pub fn destination(&self) -> String {
        format!("`{}`.`{}`", self.config.table.database, self.config.table.destination_table)
    }
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The value of the first sample of `name` in a Prometheus exposition, whatever its labels.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.trim().parse().ok()
    })
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a number of KiB")
}

/// The value of `name` for the stream `stream` (its first series labelled so): the series of a
/// stream's internal quarantine (`<stream>.quarantine`) are not it.
pub fn sample_of(metrics: &str, name: &str, stream: &str) -> Option<f64> {
    let (start, label) = (format!("{name}{{"), format!("stream=\"{stream}\""));
    metrics
        .lines()
        .filter(|l| l.starts_with(&start) && l.contains(&label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// A TCP proxy on loopback that, while `cut` is set, resets both sides of a connection as soon
/// as the server starts to answer: the server received the request whole (and ran it), the
/// client never hears. What a load balancer's idle reset, a NAT flush or a flapping link does.
pub struct CutProxy {
    pub port: u16,
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Answers cut so far.
    pub cuts: std::sync::Arc<AtomicUsize>,
}

impl CutProxy {
    /// Starts forwarding to `127.0.0.1:target` (on the caller's runtime).
    pub async fn start(target: u16) -> CutProxy {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the proxy");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cuts = std::sync::Arc::new(AtomicUsize::new(0));
        let (c, n) = (cut.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target, c.clone(), n.clone()));
            }
        });
        CutProxy { port, cut, cuts }
    }
}

async fn forward(
    client: tokio::net::TcpStream,
    target: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: std::sync::Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
    // A close is a reset, as a middlebox that drops the connection makes it.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    upstream.abort();
}
