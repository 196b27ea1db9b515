#![allow(dead_code)] // shared by the test binaries; each uses its part
//! A throwaway PostgreSQL 15 cluster for the client tests: started once per test binary
//! as the `postgres` OS user on a private Unix socket, stopped when the binary exits.
//! Each test gets a database of its own with the extension created in it. Each test
//! binary says where its cluster lives and how it is configured in `crate::CLUSTER`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

/// A test binary's cluster: directory name under the temp dir, port, and the
/// postgresql.conf lines beyond the socket and port.
pub struct ClusterSpec {
    pub name: &'static str,
    pub port: u16,
    pub settings: &'static str,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
/// Data directories of every cluster this binary started, stopped at exit.
static STARTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A directory `pg_config` reports, e.g. `--bindir`.
pub fn pg_config_dir(option: &str) -> PathBuf {
    let out = Command::new("pg_config")
        .arg(option)
        .output()
        .expect("pg_config on PATH");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn bindir() -> PathBuf {
    pg_config_dir("--bindir")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program as the `postgres` user when we are root (the server refuses
/// to run as root).
fn pg_command(program: &str) -> Command {
    let path = bindir().join(program);
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

extern "C" fn stop_clusters() {
    let started = STARTED.lock().map(|dirs| dirs.clone()).unwrap_or_default();
    for data in started {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The directory of `spec`'s cluster, emptied (a server left running there by an
/// earlier test run is stopped first) and owned by the user the server runs as.
fn empty_directory(spec: &ClusterSpec) -> PathBuf {
    let dir = std::env::temp_dir().join(spec.name);
    let data = dir.join("data");
    if data.join("postmaster.pid").exists() {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run(Command::new("chown").args(["postgres:postgres"]).arg(&dir));
    }
    dir
}

impl Cluster {
    /// This binary's shared cluster (`crate::CLUSTER`), started on first use.
    pub fn get() -> &'static Cluster {
        CLUSTER.get_or_init(|| Cluster::start(&crate::CLUSTER))
    }

    /// Starts a fresh cluster as `spec` says; it is stopped when the binary exits.
    pub fn start(spec: &ClusterSpec) -> Cluster {
        let dir = empty_directory(spec);
        run(pg_command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data")));
        Cluster::configure_and_start(dir, spec)
    }

    /// Starts a streaming standby of this cluster as `spec` says (its own directory,
    /// port and settings, added to the configuration it copies); stopped at exit too.
    pub fn start_standby(&self, spec: &ClusterSpec) -> Cluster {
        let dir = empty_directory(spec);
        run(pg_command("pg_basebackup")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync", "-D"])
            .arg(dir.join("data")));
        Cluster::configure_and_start(dir, spec)
    }

    /// Adds `spec`'s socket, port and settings to the configuration in `dir` and starts
    /// the server.
    fn configure_and_start(dir: PathBuf, spec: &ClusterSpec) -> Cluster {
        let data = dir.join("data");
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n{}\n",
            dir.display(),
            spec.port,
            spec.settings
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        let cluster = Cluster {
            dir,
            port: spec.port,
        };
        cluster.start_again();
        let mut started = STARTED.lock().unwrap();
        if started.is_empty() {
            // SAFETY: registers a plain extern "C" fn to run at process exit.
            unsafe { libc::atexit(stop_clusters) };
        }
        started.push(data);
        cluster
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint,
    /// every backend killed) and starts it again, which replays the WAL.
    pub fn restart_immediately(&self) {
        self.restart("immediate");
    }

    /// Stops the server in `mode` (`smart`, `fast`, `immediate`) and starts it again.
    pub fn restart(&self, mode: &str) {
        self.stop(mode);
        self.start_again();
    }

    pub fn stop(&self, mode: &str) {
        run(pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "stop"]));
    }

    /// Starts the stopped server.
    pub fn start_again(&self) {
        let data = self.dir.join("data");
        run(pg_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "start"]));
    }

    /// The server's log so far: what workers report goes there, not to a client.
    pub fn server_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("server.log")).unwrap_or_default())
            .into_owned()
    }

    /// How many times the server has said it is ready for connections: read it before
    /// causing a crash, and give it to [`Cluster::wait_until_restarted`].
    pub fn times_ready(&self) -> usize {
        self.server_log()
            .matches("database system is ready to accept connections")
            .count()
    }

    /// Waits until the server has been ready again since `times_ready` was `before` (a
    /// crash restart after it) and accepts connections. Connecting alone can succeed
    /// before the postmaster has even noticed the crash.
    pub fn wait_until_restarted(&self, before: usize, timeout: Duration) {
        wait_for("the server to restart", timeout, || {
            (self.times_ready() > before).then_some(())
        });
        self.wait_until_accepting(timeout);
    }

    /// Waits until the server accepts connections (after a crash restart, say).
    pub fn wait_until_accepting(&self, timeout: Duration) {
        wait_for("the server to accept connections", timeout, || {
            Client::connect(
                &format!(
                    "host={} port={} user=postgres dbname=postgres connect_timeout=2",
                    self.dir.display(),
                    self.port
                ),
                NoTls,
            )
            .ok()
            .map(|_| ())
        });
    }

    /// A connection as `postgres` whose NOTICEs and WARNINGs ("SEVERITY: message") arrive
    /// on the returned channel.
    pub fn connect_with_notices(
        &self,
        dbname: &str,
    ) -> (Client, std::sync::mpsc::Receiver<String>) {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let client = postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .notice_callback(move |notice| {
                let _ = tx.send(format!("{}: {}", notice.severity(), notice.message()));
            })
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connect to {dbname}: {e}"));
        (client, rx)
    }

    pub fn connect(&self, dbname: &str) -> Client {
        self.connect_as(dbname, "postgres")
    }

    pub fn connect_as(&self, dbname: &str, user: &str) -> Client {
        Client::connect(
            &format!(
                "host={} port={} user={user} dbname={dbname}",
                self.dir.display(),
                self.port
            ),
            NoTls,
        )
        .unwrap_or_else(|e| panic!("connect to {dbname} as {user}: {e}"))
    }
}

/// A fresh database with pg_chunkwise installed, named after the test.
pub fn test_db(name: &str) -> Client {
    fresh_db(Cluster::get(), name, "CREATE EXTENSION pg_chunkwise")
}

/// A fresh database `name` on `cluster`, set up with `create_extension`.
pub fn fresh_db(cluster: &Cluster, name: &str, create_extension: &str) -> Client {
    let mut admin = cluster.connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let mut client = cluster.connect(name);
    client.batch_execute(create_extension).unwrap();
    client
}

/// The first column of every row `sql` returns.
pub fn column<T: for<'a> postgres::types::FromSql<'a>>(db: &mut Client, sql: &str) -> Vec<T> {
    db.query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Everything the extension has defined, queued and recorded, as one comparable value:
/// refused calls must leave it unchanged.
pub fn queue_snapshot(client: &mut Client) -> String {
    one(
        client,
        "SELECT coalesce((SELECT string_agg(t::text, '|' ORDER BY task_id) FROM chunkwise.tasks t), '') || '#' || \
                coalesce((SELECT string_agg(i::text, '|' ORDER BY item_id) FROM chunkwise.items i), '') || '#' || \
                coalesce((SELECT string_agg(r::text, '|' ORDER BY run_id) FROM chunkwise.run_history r), '')",
    )
}

/// The first column of the one row `sql` returns.
pub fn one<T: for<'a> postgres::types::FromSql<'a>>(db: &mut Client, sql: &str) -> T {
    db.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The first two columns of the one row `sql` returns.
pub fn two<A, B>(db: &mut Client, sql: &str) -> (A, B)
where
    A: for<'a> postgres::types::FromSql<'a>,
    B: for<'a> postgres::types::FromSql<'a>,
{
    let row = db
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (row.get(0), row.get(1))
}

/// Polls `check` until it returns Some or the deadline passes (then panics with `what`).
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The SQLSTATE and hint of a failed statement.
pub fn sql_error(
    result: Result<impl std::fmt::Debug, postgres::Error>,
) -> (String, String, String) {
    let err = result.expect_err("the statement should have failed");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    (
        db.code().code().to_string(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}
