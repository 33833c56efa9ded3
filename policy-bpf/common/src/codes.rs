//! The small codes the kernel program and user space exchange, one enum per
//! concern. Map values keep the plain integer (every bit pattern must be a
//! valid value there); these enums are the vocabulary for writing and
//! reading it: `code()` to store, `from_code()` to decode.
//!
//! Bit flags that combine (leaf, event, conntrack and TCP flags) stay
//! constants next to the structs that carry them; map names are in
//! [`crate::map_names`].

/// Declares a fieldless enum over one integer type with `code`,
/// `from_code` and `ALL`.
macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr, )+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every code, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The integer stored in maps and events.
            #[inline(always)]
            pub const fn code(self) -> $repr {
                self as $repr
            }

            /// The code an integer stands for; `None` for an unknown one.
            #[inline(always)]
            pub const fn from_code(code: $repr) -> Option<Self> {
                $( if code == $value { return Some($name::$variant); } )+
                None
            }
        }
    };
}

codes! {
    /// Operation of a [`crate::LoweredNode`].
    pub enum NodeOp: u8 {
        /// A leaf: the verdict (`value` is the rule index).
        Leaf = 0,
        /// `feature < value`.
        Less = 1,
        /// Membership bit `value` set for the peer.
        Bit = 2,
    }
}

codes! {
    /// The packet feature a [`NodeOp::Less`] node compares.
    pub enum NodeFeature: u8 {
        /// IP protocol.
        Protocol = 0,
        /// The enforcing endpoint's port.
        LocalPort = 1,
        /// The peer's port.
        PeerPort = 2,
        /// ICMP type.
        IcmpType = 3,
        /// ICMP code.
        IcmpCode = 4,
    }
}

codes! {
    /// Direction of a slot, as a pod sees it.
    pub enum HookDirection: u8 {
        /// Traffic leaving the pod (program on the host veth's TC ingress).
        Egress = 0,
        /// Traffic entering the pod (program on the host veth's TC egress).
        Ingress = 1,
    }
}

codes! {
    /// Address family of keys and events.
    pub enum AddressFamily: u8 {
        /// IPv4.
        V4 = 4,
        /// IPv6.
        V6 = 6,
    }
}

codes! {
    /// Why a verdict event was emitted.
    pub enum EventReason: u8 {
        /// A policy decision (drops always, allows sampled).
        Policy = 0,
        /// The packet belongs to an approved connection.
        Established = 1,
        /// The packet could not be parsed (truncated or malformed header).
        Malformed = 2,
        /// A non-first fragment whose first fragment was not allowed.
        Fragment = 3,
        /// The endpoint sent from an address that is not its own.
        Spoofed = 4,
        /// The decision walk exceeded its bound or hit a missing node.
        Walk = 5,
    }
}

codes! {
    /// Index of a datapath statistic (per-CPU array `PALISADE_STATS`).
    pub enum Statistic: u32 {
        /// New flows judged by policy.
        NewFlows = 0,
        /// Packets of approved connections.
        Established = 1,
        /// Drops of malformed packets.
        Malformed = 2,
        /// Drops of fragments without an allowed head.
        Fragment = 3,
        /// Drops of spoofed sources.
        Spoofed = 4,
        /// Drops from a failed walk.
        Walk = 5,
        /// Packets on interfaces with no programs (passed: not a Palisade endpoint).
        Unmanaged = 6,
        /// Verdict events lost because the ring buffer was full.
        EventsLost = 7,
        /// Non-IP frames (ARP, ...), passed.
        NonIp = 8,
        /// Allowed new connections that could not be tracked because the
        /// conntrack table was full (passed as the policy said; their replies
        /// meet policy again). Nonzero means the table needs sweeping more
        /// often or a larger size.
        CtFull = 9,
        /// Allowed packets whose approval could not be recorded because
        /// another CPU was writing the same conntrack entry at that instant
        /// (passed as the policy said; the connection's next packet records it).
        CtContended = 10,
        /// Allowed packets from a pod handed straight to a local pod (see
        /// [`crate::LocalEndpoint`]).
        Delivered = 11,
        /// New connections written to their way's home entry because the
        /// next log entries still held live connections (see
        /// [`crate::CtEntry4`]): the cost of a new flow without the log. A
        /// steady share means connections outliving half the table's
        /// capacity in new flows fill the log.
        CtHome = 12,
        /// New connections to a Service frontend translated to a backend.
        ServiceNat = 13,
        /// Packets of translated connections (either way).
        ServiceTranslated = 14,
        /// Service traffic dropped (source ranges, no local endpoint,
        /// an unallocated service address).
        ServiceDrop = 15,
        /// Service traffic answered with ICMP unreachable (no usable endpoint,
        /// an unknown port of a ClusterIP).
        ServiceReject = 16,
        /// New service connections translated but not recorded: the NAT table
        /// could not take the entry (later packets are decided again).
        ServiceNatFull = 17,
    }
}

impl Statistic {
    /// Number of statistics (entries of `PALISADE_STATS`).
    pub const COUNT: u32 = Self::ALL.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_refused() {
        for op in NodeOp::ALL {
            assert_eq!(NodeOp::from_code(op.code()), Some(*op));
        }
        assert_eq!(NodeOp::from_code(3), None);
        assert_eq!(AddressFamily::from_code(6), Some(AddressFamily::V6));
        assert_eq!(AddressFamily::from_code(5), None);
        for (i, s) in Statistic::ALL.iter().enumerate() {
            assert_eq!(s.code() as usize, i, "statistics index an array");
        }
        assert_eq!(Statistic::COUNT, 18);
    }
}
