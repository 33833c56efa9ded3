//! Attaching the TC programs to interfaces (TCX links pinned per interface and hook),
//! adopting links pinned by an earlier run, and detaching.

use super::*;

impl Datapath {
    pub(super) fn link_path(&self, iface: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{iface}-{}", hook.name()))
    }

    /// Attaches both programs to an interface with TCX links, pinned so they
    /// outlive this process. An existing pinned link is updated in place
    /// (atomic program replacement). Must run in the interface's netns.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_programs(iface, None)
    }

    /// Attaches the pass-through program in both places [`Self::attach`]
    /// attaches the policy programs: what TC hooks cost a packet before
    /// any policy (benchmarks measure against it). Detached like them.
    pub fn attach_pass_through(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_programs(iface, Some(Hook::PassThrough.program()))
    }

    /// Attaches the pass-through program where [`Self::attach_service`]
    /// attaches the service program: what the TC hook alone costs a
    /// packet (the service benchmarks' floor). Detached like it.
    pub fn attach_pass_through_as_service(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_hooks(iface, &[Hook::Service], Some(Hook::PassThrough.program()))
    }

    /// Attaches the NAT-state floor (`palisade_nat_floor`) where
    /// [`Self::attach_service`] attaches the service program: on every
    /// packet a NAT table lookup, on each new connection two entries
    /// recorded, nothing translated. What keeping conntrack's state alone
    /// costs traffic (the service benchmarks' second floor). Detached
    /// like it.
    pub fn attach_nat_floor_as_service(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_hooks(iface, &[Hook::Service], Some(NAT_FLOOR_PROGRAM))
    }

    /// Attaches service load balancing at the interface's TC ingress,
    /// first in line (before the policy program, which then judges the
    /// translated packet), with a pinned TCX link like the others. Must
    /// run in the interface's netns.
    pub fn attach_service(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_hooks(iface, &[Hook::Service], None)
    }

    pub(super) fn attach_programs(
        &mut self,
        iface: &str,
        stand_in: Option<&'static str>,
    ) -> Result<(), DatapathError> {
        self.attach_hooks(iface, &[Hook::FromPod, Hook::ToPod], stand_in)
    }

    fn attach_hooks(
        &mut self,
        iface: &str,
        hooks: &[Hook],
        stand_in: Option<&'static str>,
    ) -> Result<(), DatapathError> {
        for &hook in hooks {
            let path = self.link_path(iface, hook);
            // A benchmark's stand-in goes where the hook's program would.
            let program = stand_in.unwrap_or_else(|| hook.program());
            let order = if hook == Hook::Service {
                LinkOrder::first()
            } else {
                LinkOrder::default()
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| DatapathError::Load("program missing".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            let attach_err = |m: String| DatapathError::Attach {
                interface: iface.to_string(),
                message: m,
            };
            let id = match PinnedLink::from_pin(&path) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| attach_err(e.to_string()))?;
                    let _ = std::fs::remove_file(&path);
                    prog.attach_to_link(link)
                        .map_err(|e| attach_err(e.to_string()))?
                }
                Err(_) => prog
                    .attach_with_options(
                        iface,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(order),
                    )
                    .map_err(|e| attach_err(format!("TCX attach ({}): {e}", hook.name())))?,
            };
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(e.to_string()))?;
            fd.pin(&path)
                .map_err(|e| attach_err(format!("pinning link: {e}")))?;
            self.links.insert((iface.to_string(), hook), path);
        }
        Ok(())
    }

    /// Re-adopts links pinned by an earlier process: every pinned link is
    /// switched to this process's programs (atomically; traffic never sees
    /// a gap).
    pub fn adopt_links(&mut self) -> Result<Vec<String>, DatapathError> {
        let mut adopted = Vec::new();
        let dir = self.pin_dir.join("links");
        let entries = std::fs::read_dir(&dir).map_err(|e| DatapathError::Pins {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (iface, hook) = if let Some(i) = name.strip_suffix("-from-pod") {
                (i.to_string(), Hook::FromPod)
            } else if let Some(i) = name.strip_suffix("-to-pod") {
                (i.to_string(), Hook::ToPod)
            } else if let Some(i) = name.strip_suffix("-service") {
                (i.to_string(), Hook::Service)
            } else {
                continue;
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(hook.program())
                .ok_or_else(|| DatapathError::Load("program missing".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            let path = e.path();
            let err = |m: String| DatapathError::Attach {
                interface: iface.clone(),
                message: m,
            };
            let pinned = PinnedLink::from_pin(&path).map_err(|e| err(e.to_string()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| err(e.to_string()))?;
            let _ = std::fs::remove_file(&path);
            let id = prog.attach_to_link(link).map_err(|e| err(e.to_string()))?;
            let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
            fd.pin(&path).map_err(|e| err(e.to_string()))?;
            self.links.insert((iface.clone(), hook), path);
            adopted.push(format!("{iface} {}", hook.name()));
        }
        Ok(adopted)
    }

    /// Detaches the programs from an interface (removes the pinned links).
    pub fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
        for hook in [Hook::FromPod, Hook::ToPod, Hook::Service] {
            let path = self.link_path(iface, hook);
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                let _ = pinned.unpin();
            }
            self.links.remove(&(iface.to_string(), hook));
        }
        Ok(())
    }
}
