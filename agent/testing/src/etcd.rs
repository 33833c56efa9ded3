//! Real etcd clusters on loopback for tests: Debian's `etcd` binary, one
//! process per member with its own data directory and free ports, stopped
//! and removed on drop (also when the test fails). Members can be killed and
//! started again; TLS with client certificates is made with `openssl`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What starting or driving a cluster failed with.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd or etcdctl is not installed (`cargo xtask test` installs it).
    #[error("{0} is not installed (Debian: apt-get install etcd-server etcd-client)")]
    Missing(&'static str),
    /// A command failed.
    #[error("{command}: {message}")]
    Command {
        /// What ran.
        command: String,
        /// Its error output or failure.
        message: String,
    },
    /// The cluster did not answer in time.
    #[error("etcd did not become healthy within {0:?}; the members' last log lines:\n{1}")]
    NotHealthy(Duration, String),
}

/// CA, server and client certificates (PEM) for a TLS cluster.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The servers' certificate (for 127.0.0.1) and key.
    pub server_cert: PathBuf,
    /// The servers' key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA, and its key.
    pub client_cert: PathBuf,
    /// The client's key.
    pub client_key: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), EtcdError> {
    let out = cmd.output().map_err(|e| EtcdError::Command {
        command: format!("{cmd:?}"),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(EtcdError::Command {
            command: format!("{cmd:?}"),
            message: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

impl TlsFiles {
    /// Makes a CA and certificates signed by it in `dir` with openssl.
    pub fn generate(dir: &Path) -> Result<TlsFiles, EtcdError> {
        std::fs::create_dir_all(dir).map_err(|e| EtcdError::Command {
            command: format!("mkdir {}", dir.display()),
            message: e.to_string(),
        })?;
        let p = |n: &str| dir.join(n);
        let openssl = |args: &[&str]| {
            let mut c = Command::new("openssl");
            c.args(args).current_dir(dir);
            run(&mut c)
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=palisade-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        std::fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .map_err(|e| EtcdError::Command {
            command: "write server.ext".into(),
            message: e.to_string(),
        })?;
        std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").map_err(|e| {
            EtcdError::Command {
                command: "write client.ext".into(),
                message: e.to_string(),
            }
        })?;
        for (who, cn) in [("server", "etcd"), ("client", "palisade-agent")] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ])?;
        }
        Ok(TlsFiles {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        })
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of local processes.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
    token: String,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

fn free_port() -> Result<u16, EtcdError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| EtcdError::Command {
            command: "bind 127.0.0.1:0".into(),
            message: e.to_string(),
        })
}

/// One change in etcd's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The revision it took.
    pub revision: u64,
    /// The key.
    pub key: String,
    /// Deleted (else written).
    pub deleted: bool,
}

/// Whether etcd and etcdctl are installed.
pub fn installed() -> bool {
    [("etcd", "--version"), ("etcdctl", "version")]
        .iter()
        .all(|(b, arg)| {
            Command::new(b)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

impl EtcdCluster {
    /// Starts `members` members under `dir` (created; removed on drop) and
    /// waits until every one is healthy. With `tls`, clients must present a
    /// certificate signed by its CA.
    pub fn start(dir: &Path, members: usize, tls: Option<TlsFiles>) -> Result<Self, EtcdError> {
        if !installed() {
            return Err(EtcdError::Missing("etcd"));
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| EtcdError::Command {
            command: format!("mkdir {}", dir.display()),
            message: e.to_string(),
        })?;
        let mut ms = Vec::new();
        for i in 0..members {
            ms.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            dir: dir.to_path_buf(),
            members: ms,
            tls,
            token: format!("palisade-{}-{}", std::process::id(), dir.display()),
        };
        for i in 0..members {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(&(0..members).collect::<Vec<_>>())?;
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// The TLS files, for a TLS cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn spawn(&mut self, i: usize) -> Result<(), EtcdError> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .map_err(|e| EtcdError::Command {
                command: "open member log".into(),
                message: e.to_string(),
            })?;
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            // Short elections: a killed leader is replaced in about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key);
        }
        let child = cmd.spawn().map_err(|e| EtcdError::Command {
            command: "etcd".into(),
            message: e.to_string(),
        })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// `etcdctl` against members `which`, with the client certificate.
    pub fn etcdctl(&self, which: &[usize], args: &[&str]) -> Result<String, EtcdError> {
        let endpoints: Vec<String> = which.iter().map(|i| self.endpoint(*i)).collect();
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=3s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        let out = cmd.args(args).output().map_err(|e| EtcdError::Command {
            command: format!("etcdctl {}", args.join(" ")),
            message: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(EtcdError::Command {
                command: format!("etcdctl {}", args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_healthy(&self, which: &[usize]) -> Result<(), EtcdError> {
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        loop {
            if self.etcdctl(which, &["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                // The folder goes with the cluster: the logs' ends go in
                // the error.
                let tails: Vec<String> = which
                    .iter()
                    .map(|i| {
                        let name = &self.members[*i].name;
                        let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                            .unwrap_or_default();
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                        format!("{name}:\n{tail}")
                    })
                    .collect();
                return Err(EtcdError::NotHealthy(limit, tails.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL, as a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdError> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(&[i])
    }

    /// Kills every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every member again and waits until the cluster is healthy.
    pub fn restart_all(&mut self) -> Result<(), EtcdError> {
        for i in 0..self.members.len() {
            self.kill(i);
            self.spawn(i)?;
        }
        self.wait_healthy(&(0..self.members.len()).collect::<Vec<_>>())
    }

    /// Every change to keys under `prefix` from the first revision to
    /// now, in order: etcd keeps its whole history until compacted, and
    /// these clusters never compact. (A watch from revision 1 replays it;
    /// a key written last marks where now is.)
    pub fn history(&self, prefix: &str) -> Result<Vec<Change>, EtcdError> {
        use std::io::BufRead;
        let all: Vec<usize> = (0..self.members.len()).collect();
        let end = "/palisade-testing/history-end";
        self.etcdctl(&all, &["put", end, "now"])?;
        let failed = |message: String| EtcdError::Command {
            command: "etcdctl watch --rev=1".into(),
            message,
        };
        let mut cmd = Command::new("timeout");
        // A bound on a watch that never reaches the end mark.
        cmd.args(["120", "etcdctl"])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint(0)));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        let mut child = cmd
            .args(["watch", "--rev=1", "--prefix", "/", "-w", "fields"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no output".into()))?;
        let (mut changes, mut kind, mut key) = (Vec::new(), None, None);
        let mut reached = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.map_err(|e| failed(e.to_string()))?;
            let Some((field, value)) = line.split_once(" : ") else {
                continue;
            };
            match field {
                "\"Type\"" => kind = Some(value == "DELETE"),
                "\"Key\"" => key = Some(value.trim_matches('"').to_string()),
                "\"ModRevision\"" => {
                    let (Some(deleted), Some(k)) = (kind.take(), key.take()) else {
                        continue;
                    };
                    if k == end {
                        reached = true;
                        break;
                    }
                    let revision = value.parse().map_err(|_| failed(line.clone()))?;
                    if k.starts_with(prefix) {
                        changes.push(Change {
                            revision,
                            key: k,
                            deleted,
                        });
                    }
                }
                _ => {}
            }
        }
        // `timeout` passes SIGTERM on to the watch.
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let _ = child.wait();
        if !reached {
            return Err(failed("the watch ended before now".into()));
        }
        Ok(changes)
    }

    /// The current revision.
    pub fn revision(&self) -> Result<u64, EtcdError> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let out = self.etcdctl(&all, &["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| EtcdError::Command {
            command: "etcdctl endpoint status".into(),
            message: e.to_string(),
        })?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["Status"]["header"]["revision"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// Compacts the history up to `revision` (older revisions are gone).
    pub fn compact(&self, revision: u64) -> Result<(), EtcdError> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.etcdctl(&all, &["compaction", "--physical", &revision.to_string()])
            .map(|_| ())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
