package main

import (
	"os"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// linkEndpoint is the stack's side of the device: a channel endpoint whose inbound packets pass
// through GRO, so a batch from wireguard-go reaches TCP as a few large segments.
type linkEndpoint struct {
	*channel.Endpoint
	gro gro.GRO
}

func newLinkEndpoint(mtu int) *linkEndpoint {
	l := &linkEndpoint{Endpoint: channel.New(1024, uint32(mtu), "")}
	// WireGuard authenticated every packet from a peer, whose own stack wrote its checksums: the
	// NIC would check them again, and GRO's merged packets carry none valid
	l.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	// TCP hands over up to 32 KiB at once and the stack cuts it into segments in one pass
	l.SupportedGSOKind = stack.GVisorGSOSupported
	l.gro.Init(true)
	return l
}

func (l *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	l.Endpoint.Attach(d)
	l.gro.Dispatcher = d
}

// netTun is wireguard-go's TUN device backed by the userspace TCP/IP stack: what peers send is
// injected into the stack (or into the pinger), what the stack sends goes back to wireguard-go.
type netTun struct {
	name   string
	mtu    int
	ep     *linkEndpoint
	events chan tun.Event
	out    chan []byte // packets towards the peers
	done   chan struct{}
	pinger *pinger
}

func newNetTun(name string, mtu int, ep *linkEndpoint) *netTun {
	t := &netTun{name: name, mtu: mtu, ep: ep, events: make(chan tun.Event, 4), out: make(chan []byte, 1024),
		done: make(chan struct{})}
	ep.AddNotify(t)
	t.events <- tun.EventUp
	return t
}

// WriteNotify is called by the stack for each packet it queues; blocking here is back-pressure.
func (t *netTun) WriteNotify() {
	pkt := t.ep.Read()
	if pkt == nil {
		return
	}
	view := pkt.ToView()
	pkt.DecRef()
	b := append([]byte(nil), view.AsSlice()...)
	view.Release()
	select {
	case t.out <- b:
	case <-t.done:
	}
}

func (t *netTun) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	var b []byte
	select {
	case b = <-t.out:
	case <-t.done:
		return 0, os.ErrClosed
	}
	sizes[0] = copy(bufs[0][offset:], b)
	n := 1
	for n < len(bufs) {
		select {
		case b := <-t.out:
			sizes[n] = copy(bufs[n][offset:], b)
			n++
		default:
			return n, nil
		}
	}
	return n, nil
}

func (t *netTun) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		pkt := b[offset:]
		if len(pkt) == 0 {
			continue
		}
		var proto = header.IPv4ProtocolNumber
		switch pkt[0] >> 4 {
		case 4:
		case 6:
			proto = header.IPv6ProtocolNumber
		default:
			continue
		}
		if t.pinger.intercept(pkt) {
			continue
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
		pb.NetworkProtocolNumber = proto
		// WireGuard has authenticated the packet; the peer's stack computed its checksums
		pb.RXChecksumValidated = true
		t.ep.gro.Enqueue(pb)
		pb.DecRef()
	}
	t.ep.gro.Flush()
	return len(bufs), nil
}

func (t *netTun) File() *os.File           { return nil }
func (t *netTun) MTU() (int, error)        { return t.mtu, nil }
func (t *netTun) Name() (string, error)    { return t.name, nil }
func (t *netTun) Events() <-chan tun.Event { return t.events }
func (t *netTun) BatchSize() int           { return 128 }

func (t *netTun) Close() error {
	close(t.done)
	t.ep.Close()
	close(t.events)
	return nil
}
