//! Whole hash maps read in batches (`BPF_MAP_LOOKUP_BATCH`): one system
//! call for thousands of entries, where reading entry by entry takes two
//! each (the next key, then its value). The agent's sweep and metrics read
//! the NAT table (262,144 entries) this way.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call; a hash bucket holding more than this is
/// answered with ENOSPC, and the buffer grows.
pub(super) const BATCH_ENTRIES: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map `fd` (keys `K`, values `V`, as the map
/// was created with), asking for `batch` entries a call. Entries written
/// or removed meanwhile may be missed or read twice, as with any walk of
/// a live map.
pub(super) fn lookup_all<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    batch: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut size = batch.max(1);
    let (mut keys, mut values) = (vec![K::default(); size], vec![V::default(); size]);
    // The hash map's position token: a bucket index (u32), with room to
    // spare for other map types' tokens.
    let (mut position, mut next) = ([0u64; 2], [0u64; 2]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: size as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is `union bpf_attr`'s batch member for
        // BPF_MAP_LOOKUP_BATCH, its size passed with it. The kernel writes
        // at most `count` keys and values (of the map's key and value
        // sizes, which `K` and `V` are: `Pod`, any bytes valid) into
        // buffers holding `size` of each, its token into `next` (16
        // bytes, more than a hash map's 4), and the count read back into
        // `attr`; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let error = (rc != 0).then(io::Error::last_os_error);
        match error.as_ref().and_then(io::Error::raw_os_error) {
            // The bucket at the position holds more than `size` entries.
            Some(libc::ENOSPC) => {
                size *= 2;
                keys.resize(size, K::default());
                values.resize(size, V::default());
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(error.unwrap_or_else(io::Error::last_os_error)),
        }
        let read = (attr.count as usize).min(size);
        out.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        // ENOENT: no entries past the position.
        if error.is_some() {
            return Ok(out);
        }
        position = next;
        first = false;
    }
}
