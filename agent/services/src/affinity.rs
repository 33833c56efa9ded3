//! Choosing one backend per new connection, with `sessionAffinity:
//! ClientIP`: a client keeps its backend while it stays a candidate and
//! its last new connection is younger than the timeout (each new
//! connection restarts the timer, as kube-proxy's affinity sets do).
//! Time and randomness are passed in.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::decide::Verdict;
use crate::objects::PortName;

/// Affinity entries: (service port, client) -> (backend, last use).
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    affinity: HashMap<(PortName, IpAddr), (SocketAddr, Duration)>,
}

impl Balancer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend for a new connection from `client` that `verdict`
    /// forwards, or `None` when it does not forward (or has no backend).
    /// `now` is any monotonic clock; `random` picks among candidates.
    pub fn pick(
        &mut self,
        verdict: &Verdict,
        client: IpAddr,
        now: Duration,
        random: u64,
    ) -> Option<SocketAddr> {
        let Verdict::Forward {
            service,
            backends,
            affinity_seconds,
            ..
        } = verdict
        else {
            return None;
        };
        if backends.is_empty() {
            return None;
        }
        let chosen = backends[(random % backends.len() as u64) as usize];
        let Some(timeout) = affinity_seconds.map(|s| Duration::from_secs(u64::from(s))) else {
            return Some(chosen);
        };
        let key = (service.clone(), client);
        let backend = match self.affinity.get(&key) {
            Some((b, last)) if now.saturating_sub(*last) < timeout && backends.contains(b) => *b,
            _ => chosen,
        };
        self.affinity.insert(key, (backend, now));
        Some(backend)
    }

    /// Forgets entries older than their timeouts would allow (`max_age`).
    pub fn expire(&mut self, now: Duration, max_age: Duration) {
        self.affinity
            .retain(|_, (_, last)| now.saturating_sub(*last) < max_age);
    }

    /// Live affinity entries (a metric).
    pub fn len(&self) -> usize {
        self.affinity.len()
    }

    pub fn is_empty(&self) -> bool {
        self.affinity.is_empty()
    }
}
