package main

import (
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

const (
	dialTimeout = 10 * time.Second
	udpIdle     = 2 * time.Minute
	copyBuffer  = 256 << 10
)

// relay ends peers' TCP and UDP flows in the userspace stack and opens the same flow from the
// host's own sockets: the host's routing and source address apply (SNAT comes for free).
type relay struct {
	pol    *policy
	dialer net.Dialer
}

// target is where a peer's flow to dst:port is re-originated, or false when the policy refuses it.
// The appliance itself (its tunnel address, or any other of its addresses) stands for its own
// services: only those the profile offers peers (the renderer leaves SSH out with shields up),
// reached on the host's loopback.
// Never any other loopback service: the SOCKS5 proxy, a local resolver or an admin port bound to
// 127.0.0.1 stay out of the peers' reach, as in kernel mode.
func (r *relay) target(proto string, src, dst netip.Addr, port uint16) (string, bool) {
	if r.pol.isAppliance(dst) {
		at, ok := r.pol.serves(proto, port)
		if !ok {
			return "", false
		}
		if at == "" {
			at = "127.0.0.1"
			if dst.Is6() {
				at = "::1"
			}
		}
		return net.JoinHostPort(at, strconv.Itoa(int(port))), true
	}
	if !r.pol.forward(proto, src, dst, port) {
		return "", false
	}
	return net.JoinHostPort(dst.String(), strconv.Itoa(int(port))), true
}

// looped says whether a connection the host opened for a peer ended on the host itself although
// its destination was not the appliance when it was checked (an address that appeared since): the
// kernel then picks the destination itself as the source.
func (r *relay) looped(dst netip.Addr, c net.Conn) bool {
	if r.pol.isAppliance(dst) {
		return false // asked for, and allowed by target
	}
	local, ok1 := netip.ParseAddrPort(c.LocalAddr().String())
	remote, ok2 := netip.ParseAddrPort(c.RemoteAddr().String())
	if ok1 != nil || ok2 != nil {
		return true
	}
	return local.Addr().Unmap() == remote.Addr().Unmap() || remote.Addr().IsLoopback()
}

// tcp runs in its own goroutine per connection attempt: the peer's SYN is answered only once the
// host-side connection is up, so a refused or unreachable destination refuses the peer too.
func (r *relay) tcp(req *tcp.ForwarderRequest) {
	id := req.ID()
	to, ok := r.target("tcp", addr(id.RemoteAddress), addr(id.LocalAddress), id.LocalPort)
	if !ok {
		req.Complete(true)
		return
	}
	out, err := r.dialer.Dial("tcp", to)
	if err != nil {
		req.Complete(true)
		return
	}
	if r.looped(addr(id.LocalAddress), out) {
		out.Close()
		req.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := req.CreateEndpoint(&wq)
	if terr != nil {
		req.Complete(true)
		out.Close()
		return
	}
	req.Complete(false)
	in := gonet.NewTCPConn(&wq, ep)
	go join(in, out.(*net.TCPConn))
}

type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// join copies both ways, passing each side's end of stream on to the other.
func join(a, b halfCloser) {
	done := make(chan struct{}, 2)
	pump := func(dst, src halfCloser) {
		// plain Reader/Writer: the buffer is used as given, not a 32 KiB default
		_, _ = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, copyBuffer))
		_ = dst.CloseWrite()
		done <- struct{}{}
	}
	go pump(a, b)
	go pump(b, a)
	<-done
	<-done
	a.Close()
	b.Close()
}

// udp is called for the first datagram of a flow; replies come back on the same flow until it has
// been idle for udpIdle.
func (r *relay) udp(req *udp.ForwarderRequest) {
	id := req.ID()
	to, ok := r.target("udp", addr(id.RemoteAddress), addr(id.LocalAddress), id.LocalPort)
	if !ok {
		return
	}
	out, err := net.Dial("udp", to)
	if err != nil {
		return
	}
	if r.looped(addr(id.LocalAddress), out) {
		out.Close()
		return
	}
	var wq waiter.Queue
	ep, terr := req.CreateEndpoint(&wq)
	if terr != nil {
		out.Close()
		return
	}
	in := gonet.NewUDPConn(&wq, ep)
	go func() {
		done := make(chan struct{}, 2)
		pump := func(dst, src net.Conn) {
			buf := make([]byte, 65536)
			for {
				_ = src.SetReadDeadline(time.Now().Add(udpIdle))
				n, err := src.Read(buf)
				if err != nil {
					break
				}
				if _, err := dst.Write(buf[:n]); err != nil {
					break
				}
			}
			done <- struct{}{}
		}
		go pump(out, in)
		go pump(in, out)
		<-done
		in.Close()
		out.Close()
		<-done
	}()
}
