// appliance-netstack: the userspace dataplane. wireguard-go with a userspace TCP/IP stack (gVisor)
// in place of a TUN device, in one unprivileged process: peers' TCP and UDP end in that stack and
// are opened again from the host's own sockets, ICMP echo is answered by a real ping, other
// protocols go nowhere. Local programs reach the tunnel through a SOCKS5 proxy.
//
// Keys and peers are set through wireguard-go's UAPI socket (/run/wireguard/IFACE.sock) by the
// reconciler; dataplane.json gives addresses, MTU, the forwarding rules and the SOCKS5 address.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/armon/go-socks5"
	xcontext "golang.org/x/net/context"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

const nicID = 1

// checkOnly: read and check the config (-check), then exit; no credentials are read.
var checkOnly bool

func main() {
	path := flag.String("config", "/etc/appliance/dataplane.json", "the rendered dataplane.json")
	flag.BoolVar(&checkOnly, "check", false, "decode the config (unknown fields refused) and exit")
	flag.Parse()
	if checkOnly {
		if _, err := loadConfig(*path); err != nil {
			fmt.Fprintf(os.Stderr, "appliance-netstack: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*path); err != nil {
		fmt.Fprintf(os.Stderr, "appliance-netstack: %v\n", err)
		os.Exit(1)
	}
}

func newStack(c *config) (*stack.Stack, *linkEndpoint, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: 1 << 20, Max: 8 << 20}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: 1 << 20, Max: 6 << 20}
	for _, opt := range []tcpip.SettableTransportProtocolOption{&sack, &moderate, &rcv, &snd} {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return nil, nil, fmt.Errorf("tcp option %T: %v", opt, err)
		}
	}
	ep := newLinkEndpoint(c.mtu)
	if err := s.CreateNIC(nicID, ep); err != nil {
		return nil, nil, fmt.Errorf("nic: %v", err)
	}
	// every destination is the stack's to answer for (promiscuous), from that address (spoofing)
	s.SetPromiscuousMode(nicID, true)
	s.SetSpoofing(nicID, true)
	for _, p := range c.own {
		proto := ipv4.ProtocolNumber
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(p.Addr().AsSlice()).WithPrefix()}
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return nil, nil, fmt.Errorf("address %s: %v", p, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID}})
	return s, ep, nil
}

func run(path string) error {
	c, err := loadConfig(path)
	if err != nil {
		return err
	}
	s, ep, err := newStack(c)
	if err != nil {
		return err
	}
	r := &relay{pol: &c.policy, dialer: net.Dialer{Timeout: dialTimeout}}
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcp.NewForwarder(s, 0, 1024, r.tcp).HandlePacket)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udp.NewForwarder(s, r.udp).HandlePacket)

	t := newNetTun(c.iface, c.mtu, ep)
	t.pinger = &pinger{pol: &c.policy, out: t.out}
	dev := device.NewDevice(t, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "wireguard: "))
	defer dev.Close()

	file, err := ipc.UAPIOpen(c.iface)
	if err != nil {
		return fmt.Errorf("uapi socket: %w", err)
	}
	uapi, err := ipc.UAPIListen(c.iface, file)
	if err != nil {
		return fmt.Errorf("uapi socket: %w", err)
	}
	defer uapi.Close()
	failed := make(chan error, 2)
	go func() {
		for {
			conn, err := uapi.Accept()
			if err != nil {
				failed <- fmt.Errorf("uapi: %w", err)
				return
			}
			go dev.IpcHandle(conn)
		}
	}()
	if c.socks5 != "" {
		if err := serveSocks(c, s, failed); err != nil {
			return err
		}
	}
	if err := dev.Up(); err != nil {
		return fmt.Errorf("device up: %w", err)
	}
	fmt.Printf("netstack up: %s, mtu %d\n", c.iface, c.mtu)
	stopGreeting := make(chan struct{})
	defer close(stopGreeting)
	go greetPeers(dev, stopGreeting)

	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-term:
		return nil
	case <-dev.Wait():
		return fmt.Errorf("wireguard device closed")
	case err := <-failed:
		return err
	}
}

// intoTunnel is the SOCKS5 proxy's rule: CONNECT only, and only to a peer's address in the tunnel.
// The proxy is a way into the tunnel, never a way from its clients to anything else (the LAN, the
// internet, the appliance's loopback services).
type intoTunnel struct{ pol *policy }

func (t intoTunnel) Allow(ctx xcontext.Context, req *socks5.Request) (xcontext.Context, bool) {
	if req.Command != socks5.ConnectCommand || req.DestAddr == nil {
		return ctx, false
	}
	a, ok := netip.AddrFromSlice(req.DestAddr.IP)
	return ctx, ok && t.pol.inTunnel(a.Unmap()) && !t.pol.isOwn(a.Unmap())
}

// serveSocks lets local programs (or, with a password, the LAN) reach peers by SOCKS5.
func serveSocks(c *config, s *stack.Stack, failed chan<- error) error {
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		ap, err := netip.ParseAddrPort(address)
		if err != nil || !c.policy.inTunnel(ap.Addr().Unmap()) || c.policy.isOwn(ap.Addr().Unmap()) {
			return nil, fmt.Errorf("%s is not a peer's address in the tunnel", address)
		}
		a := ap.Addr().Unmap()
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		return gonet.DialContextTCP(ctx, s, tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: ap.Port()}, proto)
	}
	conf := &socks5.Config{Dial: dial, Rules: intoTunnel{&c.policy}}
	if c.socks5Pass != "" {
		// RFC 1929 username/password: the only method offered, so a client without it is refused
		conf.Credentials = socks5.StaticCredentials{c.socks5User: c.socks5Pass}
	}
	srv, err := socks5.New(conf)
	if err != nil {
		return fmt.Errorf("socks5: %w", err)
	}
	l, err := net.Listen("tcp", c.socks5)
	if err != nil {
		return fmt.Errorf("socks5 on %s: %w", c.socks5, err)
	}
	go func() { failed <- fmt.Errorf("socks5: %w", srv.Serve(l)) }()
	return nil
}
