/* Flow expiry: an idle timeout per protocol and TCP phase, from lb_config.
 *
 * The program only compares: a flow idle past its timeout is treated as a miss (the
 * ring decides again and the flow is re-recorded with a fresh stamp), and the active's
 * flow source deletes such flows from the map, so the deletes reach the standbys.
 * Same clock as the dead-man switch (jiffies, fence.h): timeouts are seconds, a tick
 * milliseconds. */
#ifndef HALB_EXPIRY_H
#define HALB_EXPIRY_H

#include <linux/in.h>

#include "constants.h"
#include "parse.h"
#include "structs.h"

static __always_inline __u64 flow_timeout(const struct lb_config *cfg, __u8 proto, __u32 flags)
{
	if (proto != IPPROTO_TCP)
		return cfg->timeout_udp;
	return flags & FLOW_F_CLOSING ? cfg->timeout_closing : cfg->timeout_tcp;
}

/* A stamp of 0 (user space wrote the flow: synced, not seen here yet) never expires
 * here; signed, so a stamp a little ahead of this CPU's reading is not "ancient". */
static __always_inline int flow_expired(const struct flow_value *fv, __u8 proto,
					const struct lb_config *cfg, __u64 now)
{
	__u64 timeout = flow_timeout(cfg, proto, fv->flags);

	return timeout && fv->last_seen && (__s64)(now - fv->last_seen) > (__s64)timeout;
}

/* The phase a packet puts its flow in: FIN or RST start closing; a bare SYN (the
 * client port reused for a new connection) starts over as established. */
static __always_inline __u32 flow_flags(__u32 flags, __u8 tcp_flags)
{
	if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		return flags | FLOW_F_CLOSING;
	if ((tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return flags & ~FLOW_F_CLOSING;
	return flags;
}

/* A hit's bookkeeping. Each field is written only when it changes: the stamp once
 * per tick, so a busy flow's entry is not dirtied (and bounced between CPUs) by every
 * packet. */
static __always_inline void flow_touch(struct flow_value *fv, __u8 tcp_flags, __u64 now)
{
	__u32 flags = flow_flags(fv->flags, tcp_flags);

	if (flags != fv->flags)
		fv->flags = flags;
	if (fv->last_seen != now)
		fv->last_seen = now;
}

#endif
