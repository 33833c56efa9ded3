//! Cgroups of a test's own on the cgroup v2 hierarchy, for programs
//! attached to cgroups (connect-time service balancing): the processes a
//! test runs in one are the only ones its hooks see.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A cgroup v2 directory made for one test; removed on drop (once the
/// processes run in it have ended).
#[derive(Debug)]
pub struct TestCgroup(PathBuf);

/// The cgroup v2 hierarchy's mount point (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| std::io::Error::other("no cgroup v2 hierarchy is mounted"))
}

impl TestCgroup {
    /// `palisade-test-<name>-<pid>` under the v2 root.
    pub fn new(name: &str) -> std::io::Result<TestCgroup> {
        let path = cgroup2_root()?.join(format!("palisade-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TestCgroup(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Runs `f` with this whole process in this cgroup, so sockets `f`
    /// opens (on any thread) belong to it, and stay its after: the
    /// cgroup's hooks see them. The process goes back to the cgroup it
    /// was in afterwards, even if `f` panics.
    pub fn run_inside<T>(&self, f: impl FnOnce() -> T) -> std::io::Result<T> {
        /// Moves the process back on drop.
        struct Home(PathBuf);
        impl Drop for Home {
            fn drop(&mut self) {
                let _ = join(&self.0);
            }
        }
        let home = Home(own_cgroup()?);
        join(&self.0)?;
        let out = f();
        drop(home);
        Ok(out)
    }

    /// Runs a bash `script` in network namespace `netns` (a name under
    /// /run/netns) as a process of this cgroup.
    pub fn bash_in(&self, netns: &str, script: &str) -> std::io::Result<Output> {
        let joined = format!("echo $$ > {}/cgroup.procs && {script}", self.0.display());
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["bash", "-c", &joined])
            .output()
    }
}

/// Moves this process (every thread) into the cgroup at `path`.
fn join(path: &Path) -> std::io::Result<()> {
    std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
}

/// The cgroup v2 directory this process is in.
fn own_cgroup() -> std::io::Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| std::io::Error::other("this process is in no cgroup v2 cgroup"))?;
    Ok(cgroup2_root()?.join(relative.trim_start_matches('/')))
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
