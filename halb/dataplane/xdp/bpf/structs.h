/* Map keys and values. Python mirrors these in halb/dataplane/xdp/layout.py, and a
 * kernel test compares both against this object's BTF. Addresses are stored in network
 * byte order in __u32[4] (IPv4 uses word 0); padding is explicit and always zero. */
#ifndef HALB_STRUCTS_H
#define HALB_STRUCTS_H

#include <linux/types.h>

struct vip_key {
	__u32 addr[4];
	__u16 port; /* network byte order */
	__u8 proto;
	__u8 family;
};

struct service_info {
	__u32 index;     /* into stats_service and the ring (index * HALB_RING_STRIDE) */
	__u32 ring_size; /* the service's Maglev table size, <= HALB_RING_STRIDE */
	__u32 flags;     /* SVC_F_* */
};

struct backend_info {
	__u32 addr[4];
	__u8 mac[6];  /* next hop toward the backend (the backend itself in dsr) */
	__u16 port;   /* host byte order; informational (dsr/tunnel keep the port) */
	__u8 family;
	__u8 flags;   /* BACKEND_F_* (the owning service's tunnel flag included) */
	__u16 service; /* index of the owning service: its counters on a flow hit */
};

/* Key of vip_addrs: every VIP address of this node's services (the dead-man switch
 * fences ARP and neighbour solicitation for them). */
struct vip_addr {
	__u32 addr[4];
	__u8 family;
	__u8 pad[3];
};

struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport; /* network byte order */
	__u16 dport; /* network byte order */
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct flow_value {
	__u32 backend_id;
	__u32 flags; /* FLOW_F_* (the program's own bookkeeping; not synced) */
	/* jiffies of the last packet forwarded; 0 = written by user space (a synced flow)
	 * and not seen here yet: never expired by the program, stamped by its first
	 * packet. Not synced either. */
	__u64 last_seen;
};

/* A flow_events record: a flow the program has just recorded in `flows` (the map's
 * key and value as they are), for the active's flow source (flowsource.py). */
struct flow_event {
	struct flow_key key;
	struct flow_value value;
};
_Static_assert(sizeof(struct flow_event) == 56, "flow_event: key 40 + value 16, no padding");

struct lb_config {
	/* Dead-man switch as the adapter was given it (CLOCK_MONOTONIC_COARSE ns, the
	 * caller's deadline minus two ticks; 0 = disarmed): for people and tools. The
	 * program tests deadline_jiffies, the same instant on its own clock (fence.h). */
	__u64 deadline_ns;
	__u32 local_v4;     /* outer source of IPv4 tunnels */
	__u32 local_v6[4];  /* outer source of IPv6 tunnels */
	__u8 local_mac[6];  /* source MAC of every forwarded frame */
	__u8 pad[2];
	__u32 flags; /* CFG_F_* */
	/* Idle timeouts of a flow, by protocol and TCP phase (jiffies; 0 = never): a flow
	 * idle for longer is a miss (the ring decides again, the flow is re-recorded), and
	 * the active's flow source deletes it from the map. */
	__u64 timeout_tcp;     /* TCP, established */
	__u64 timeout_closing; /* TCP after a FIN or RST */
	__u64 timeout_udp;
	/* Past this jiffies value VIP traffic, ARP requests and neighbour solicitations
	 * for a VIP address drop; 0 = disarmed. */
	__u64 deadline_jiffies;
	/* The program's clock as user space reads it: jiffies clock_jiffies was
	 * CLOCK_MONOTONIC_COARSE clock_ns, one jiffy is tick_ns (written by the adapter;
	 * the program does not read them). */
	__u64 clock_jiffies;
	__u64 clock_ns;
	__u64 tick_ns;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

#endif
