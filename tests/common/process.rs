//! Running the `nexus` binary in tests: a free port, a child that is killed on drop, and
//! waiting for HTTP readiness.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now. Another process may take it before the caller binds
/// it: prefer binding port 0 (nexus: [`LISTEN_ANY`] and [`Nexus::wait_listening`]).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (Linux `/proc`): tells
/// a child's own listener from another process's on the port it was told to bind.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(tcp) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Columns: sl, local address (hex ip:port), remote, state (0A: listen), …, inode (10th).
    let sockets: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *cols.get(3)? == "0A")
                .then(|| format!("socket:[{}]", cols.get(9).unwrap_or(&"")))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    !sockets.is_empty()
        && fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
        })
}

/// `http.listen` for a test process: the kernel picks the port when nexus binds it.
pub const LISTEN_ANY: &str = "127.0.0.1:0";

/// A `nexus` child process; SIGKILLed on drop so no test leaves one running.
pub struct Nexus {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Drop for Nexus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nexus {
    /// Starts `nexus <args>` with extra env, logging to `<dir>/<name>.log`.
    pub fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> Nexus {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexus"));
        cmd.args(args)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info")
            // Text logs: tests read them (`wait_listening`); `env` may still override it.
            .env("NEXUS_TELEMETRY__LOG_FORMAT", "text");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn nexus");
        Nexus { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (graceful drain).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The address the process listens on, from its `listening` log line (started with
    /// [`LISTEN_ANY`]); panics with the log if it exits first or takes longer than `within`.
    pub async fn wait_listening(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log_text();
            // Whole lines only: the last may be half written.
            let whole = log.rsplit_once('\n').map_or("", |(whole, _)| whole);
            let addr = whole
                .lines()
                .filter(|l| l.contains(" listening "))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")));
            if let Some(addr) = addr {
                return addr.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nexus exited with {status}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "nexus not listening in {within:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `url` answers 200, or panics with the process log.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, url: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nexus exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{url} not ready in {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `nexus <args>` to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexus"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run nexus");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sum of the samples of `metric` whose labels contain every `needle`.
pub fn metric_sum(rendered: &str, metric: &str, needles: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in rendered.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' '))
            || !needles.iter().all(|n| line.contains(n))
        {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}
