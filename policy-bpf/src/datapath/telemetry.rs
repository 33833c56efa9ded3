//! What the loaded programs report: the kernel clock, test runs, run-time statistics,
//! counters, events, conntrack contents and a read-back of every map.

use super::*;
use policy_bpf_common::map_names;

impl Datapath {
    /// Runs a program on a packet with `BPF_PROG_TEST_RUN` (`repeat` times).
    /// The packet arrives on this thread's netns loopback (ifindex 1).
    pub fn run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<RunResult, DatapathError> {
        self.test_run(hook.program(), packet, repeat, 0)
            .map(|(r, _)| r)
    }

    /// [`Datapath::run`] on a packet arriving on interface `ifindex`, a
    /// device of the calling thread's network namespace (0 or 1: loopback),
    /// as the programs see it when attached there.
    pub fn run_on(
        &self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<RunResult, DatapathError> {
        self.test_run(hook.program(), packet, repeat, ifindex)
            .map(|(r, _)| r)
    }

    /// The loaded TC program `name`.
    pub(super) fn classifier(&self, name: &str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))
    }

    /// Runs the named program on `packet` with BPF_PROG_TEST_RUN; returns
    /// the result and the packet as the program left it.
    pub(super) fn test_run(
        &self,
        name: &str,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(RunResult, Vec<u8>), DatapathError> {
        let prog = self.classifier(name)?;
        let mut out = vec![0u8; packet.len() + 256];
        // A `struct __sk_buff` up to its `ifindex` (offset 40), the one
        // field set: the kernel delivers the packet on that device.
        let mut skb = [0u8; 44];
        skb[40..].copy_from_slice(&ifindex.to_ne_bytes());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: (ifindex > 1).then_some(&skb[..]),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| DatapathError::TestRun(chain(&e)))?;
        let result = RunResult {
            retval: r.return_value as i32,
            duration_ns: r.duration.as_nanos() as u64,
        };
        // The packet as the program left it (it may have grown or shrunk).
        out.truncate(r.data_size_out as usize);
        Ok((result, out))
    }

    /// Turns on the kernel's run-time statistics of every BPF program
    /// until the returned descriptor is dropped (each run then reads the
    /// clock twice; see [`Datapath::program_stats`]).
    pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, DatapathError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| DatapathError::RunTimeStats(e.to_string()))
    }

    /// The kernel's run-time statistics of a hook's program: total time
    /// and runs, counted while statistics are enabled (`BPF_ENABLE_STATS`,
    /// `aya::sys::enable_stats`, or `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self, hook: Hook) -> Result<(std::time::Duration, u64), DatapathError> {
        let name = hook.program();
        let prog = self.classifier(name)?;
        let info = prog.info().map_err(|e| DatapathError::ProgramInfo {
            program: name,
            message: e.to_string(),
        })?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Instructions the verifier went through to accept each TC program
    /// (of its limit of 1,000,000): how close a program is to being
    /// refused.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        let mut out = Vec::new();
        for name in super::TC_PROGRAMS {
            let prog = self.classifier(name)?;
            let info = prog.info().map_err(|e| DatapathError::ProgramInfo {
                program: name,
                message: e.to_string(),
            })?;
            out.push((name, info.verified_instruction_count().unwrap_or(0)));
        }
        Ok(out)
    }

    /// As [`Datapath::program_stats`] for a socket hook (one of
    /// [`super::SOCKET_PROGRAMS`]); zero runs if it was never loaded.
    pub fn socket_program_stats(
        &self,
        name: &'static str,
    ) -> Result<(std::time::Duration, u64), DatapathError> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?;
        if prog.fd().is_err() {
            return Ok((std::time::Duration::ZERO, 0));
        }
        let info = prog.info().map_err(|e| DatapathError::ProgramInfo {
            program: name,
            message: e.to_string(),
        })?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Packet and byte counters of a rule index, summed over CPUs.
    pub fn counter(&self, rule: u32) -> Result<Counter, DatapathError> {
        let v = self
            .counters
            .get(&rule, 0)
            .map_err(map_err(map_names::COUNTERS))?;
        Ok(v.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Datapath statistics (`STAT_*`), summed over CPUs.
    pub fn stats(&self) -> Result<[u64; Statistic::COUNT as usize], DatapathError> {
        let mut out = [0u64; Statistic::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(map_names::STATS))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// Drains the verdict events the programs reported.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(e) = Event::from_bytes(&item) {
                out.push(e);
            }
        }
        out
    }

    /// The ring buffer's file descriptor, for polling.
    pub fn events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Number of tracked connections.
    pub fn conntrack_len(&self) -> usize {
        self.conn4.len() + self.conn6.len()
    }

    /// Tracked connections held in a log entry rather than their way's
    /// home (see [`CtEntry4`]); the rest of [`Datapath::conntrack_len`]
    /// were inserted while the log's next entries were taken.
    pub fn conntrack_logged(&self) -> usize {
        self.conn4.logged() + self.conn6.logged()
    }

    /// Copies of the tracked IPv4 and IPv6 connections.
    pub fn conntrack_entries(&self) -> (Vec<CtEntry4>, Vec<CtEntry6>) {
        (self.conn4.entries(), self.conn6.entries())
    }

    /// Removes tracked connections idle for longer than their timeout (the
    /// timeouts in the program's configuration) and returns how many went.
    ///
    /// Conntrack is a fixed-size set-associative table: the programs
    /// reuse a way whose connection expired when a new connection hashes
    /// to its set, but sets nobody inserts into keep their dead. Whoever
    /// owns the datapath calls this periodically (every few seconds under
    /// load; `Statistic::CtFull` counts connections that found their set full of
    /// live ones).
    pub fn expire_conntrack(&self) -> Result<usize, DatapathError> {
        let cfg = self.config()?;
        let (now, _) = self.kernel_clock()?;
        Ok(self.conn4.expire(&cfg, now) + self.conn6.expire(&cfg, now))
    }

    /// Forgets every tracked connection; returns how many there were.
    pub fn flush_conntrack(&self) -> usize {
        self.conn4.free_where(|_| true) + self.conn6.free_where(|_| true)
    }

    /// The entries live policy depends on: nodes reachable from the slots,
    /// identity and class slots the prefixes point at (for a restart).
    pub fn read_in_use(&self) -> InUse {
        let mut u = InUse::default();
        let mut stack: Vec<u32> = self
            .slots
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.root)
            .collect();
        while let Some(i) = stack.pop() {
            if !u.nodes.insert(i) {
                continue;
            }
            if let Ok(n) = self.nodes.get(&i, 0)
                && n.op != NodeOp::Leaf.code()
            {
                stack.push(n.then);
                stack.push(n.otherwise);
            }
        }
        let classes = self
            .lpm4
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v)
            .chain(self.lpm6.iter().filter_map(Result::ok).map(|(_, v)| v));
        for c in classes {
            if c.identity > 0 {
                u.identities.insert(c.identity - 1);
            }
            u.classes.insert(c.class);
        }
        u
    }

    /// A membership layout word as the programs read it.
    pub(super) fn layout(&self, which: u32) -> u64 {
        self.layouts
            .get(which)
            .map_or(0, |w| w.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Reads back the slots, LPM entries and row layouts (for adoption
    /// after a restart).
    pub fn read_mirror(&self) -> Mirror {
        Mirror {
            slots: self.slots.iter().filter_map(Result::ok).collect(),
            interfaces: self
                .ifaces
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Ok(v) if v.managed != 0 => Some((i as u32, v.zone)),
                    _ => None,
                })
                .chain(self.managed.iter().filter_map(Result::ok))
                .collect(),
            lpm4: self
                .lpm4
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect(),
            lpm6: self
                .lpm6
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect(),
            layouts: (self.layout(LAYOUT_IDENTITIES), self.layout(LAYOUT_CLASSES)),
            ..Mirror::default()
        }
    }
}

impl Datapath {
    /// The conntrack clock as the programs read it: (jiffies, coarse
    /// monotonic nanoseconds), from one run of the clock program.
    pub fn kernel_clock(&self) -> Result<(u64, u64), DatapathError> {
        // An Ethernet-sized frame; the program overwrites its first 16 bytes.
        let (r, out) = self.test_run(CLOCK_PROGRAM, &[0u8; 64], 1, 0)?;
        // TC_ACT_SHOT: bpf_skb_store_bytes failed.
        if r.retval == 2 {
            return Err(DatapathError::Clock(
                "the clock program could not write its packet".into(),
            ));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&out[8 * i..8 * i + 8]);
            u64::from_ne_bytes(b)
        };
        Ok((word(0), word(1)))
    }

    /// Ticks per second of the conntrack clock (the kernel's HZ), measured
    /// once per process over about 60 ms of the clock program's readings.
    pub fn ticks_per_s(&self) -> Result<u32, DatapathError> {
        static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, t0) = self.kernel_clock()?;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let (j, t) = self.kernel_clock()?;
            let (ticks, ns) = (j.saturating_sub(j0), t.saturating_sub(t0));
            if ns >= 60_000_000 && ticks >= 6 {
                return Ok(*HZ.get_or_init(|| snap_hz(ticks, ns)));
            }
            if ns > 2_000_000_000 {
                return Err(DatapathError::Clock(format!(
                    "measuring the kernel's tick rate: {ticks} jiffies in {ns} ns"
                )));
            }
        }
    }
}

/// Kernel tick rates (CONFIG_HZ) a measurement is snapped to: at least 20%
/// apart, so the 8% windows around them never overlap.
pub(super) const KNOWN_HZ: [u32; 6] = [100, 200, 250, 300, 500, 1000];

/// Ticks per second from `ticks` jiffies seen over `ns` nanoseconds of the
/// coarse clock, which the kernel advances in the same tick update: a
/// known rate within 8%, else the rounded measurement. (A reading taken
/// between the jiffies increment and the clock update is a tick off: over
/// the 60 ms and 6 ticks measured that stays within 8% but at 100 Hz.)
pub(super) fn snap_hz(ticks: u64, ns: u64) -> u32 {
    let raw = ticks as f64 * 1e9 / ns.max(1) as f64;
    KNOWN_HZ
        .into_iter()
        .find(|&hz| (raw - f64::from(hz)).abs() <= 0.08 * f64::from(hz))
        .unwrap_or(raw.round().clamp(1.0, 100_000.0) as u32)
}
