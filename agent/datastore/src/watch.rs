//! Following the embedded store: the change log is watched with inotify, so
//! a watcher wakes as soon as a writer's batch is on disk, never on a timer.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::{EmbeddedStore, Follower, Revision, StoreChange, StoreError};

/// The changes of an [`EmbeddedStore`] after a revision, as they are written.
#[derive(Debug)]
pub struct Watch {
    store: EmbeddedStore,
    inotify: Inotify,
    after: Revision,
}

impl Watch {
    /// Follows `store` from the changes after revision `after`. The watch
    /// is in place before the first read, so no write can fall between.
    pub fn new(store: EmbeddedStore, after: Revision) -> Result<Self, StoreError> {
        let log = store.log_path();
        let failed = |e: Errno| StoreError::Io {
            path: log.display().to_string(),
            source: e.into(),
        };
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(failed)?;
        inotify
            .add_watch(
                &log,
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(failed)?;
        Ok(Self {
            store,
            inotify,
            after,
        })
    }

    fn failed(&self, e: Errno) -> StoreError {
        StoreError::Io {
            path: self.store.log_path().display().to_string(),
            source: e.into(),
        }
    }
}

impl Follower for Watch {
    fn revision(&self) -> Revision {
        self.after
    }

    /// Waits for a writer; whole batches only.
    fn next(&mut self, timeout: Option<Duration>) -> Result<Vec<StoreChange>, StoreError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            // Drain the events first: a write after this read wakes the poll.
            match self.inotify.read_events() {
                Ok(_) | Err(Errno::EAGAIN) => {}
                Err(e) => return Err(self.failed(e)),
            }
            let changes = self.store.changes_since(self.after)?;
            if let Some(last) = changes.last() {
                self.after = last.revision();
                return Ok(changes);
            }
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Vec::new());
                    }
                    // Whole milliseconds (at least one), at most u16::MAX at a
                    // time: the loop checks the deadline again.
                    let ms = left.as_millis().min(u128::from(u16::MAX)) as u16;
                    PollTimeout::from(ms.max(1))
                }
            };
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(self.failed(e)),
            }
        }
    }
}
