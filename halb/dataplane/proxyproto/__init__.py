"""In-kernel PROXY protocol insertion for full-NAT flows (issue 17): a TC program pair
(bpf/proxy.bpf.c) that puts a PROXY header in front of a flow's first byte toward the
backend and shifts seq / ack / SACK for the rest of the connection; its build, layout
and loader. See README.md here."""
