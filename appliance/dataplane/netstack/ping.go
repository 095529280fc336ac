package main

import (
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const echoTimeout = 5 * time.Second

// pinger answers a peer's ICMP echo request to a host off the appliance with the reply of a real
// ping from the host's own (unprivileged) ping socket, so the peer learns whether the host is up.
type pinger struct {
	pol *policy
	out chan<- []byte
}

// intercept takes ICMP echo requests that leave the appliance; anything else goes on to the stack.
func (pg *pinger) intercept(pkt []byte) bool {
	var src, dst netip.Addr
	var body []byte
	if pkt[0]>>4 == 4 {
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv4ProtocolNumber ||
			ip.FragmentOffset() != 0 || ip.More() {
			return false
		}
		body = ip.Payload()
		if len(body) < header.ICMPv4MinimumSize || header.ICMPv4(body).Type() != header.ICMPv4Echo {
			return false
		}
		src, dst = addr(ip.SourceAddress()), addr(ip.DestinationAddress())
	} else {
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber {
			return false
		}
		body = ip.Payload()
		if len(body) < header.ICMPv6EchoMinimumSize || header.ICMPv6(body).Type() != header.ICMPv6EchoRequest {
			return false
		}
		src, dst = addr(ip.SourceAddress()), addr(ip.DestinationAddress())
	}
	if pg.pol.isOwn(dst) {
		// the stack itself answers for the appliance's tunnel addresses, unless shields are up
		return pg.pol.shieldsUp
	}
	if pg.pol.isAppliance(dst) {
		// another address of the appliance (LAN, uplink): its own answer, as in kernel mode, unless
		// shields are up
		if !pg.pol.shieldsUp {
			req := append([]byte(nil), body...)
			go pg.echo(src, dst, req)
		}
		return true
	}
	if pg.pol.forward("icmp", src, dst, 0) {
		req := append([]byte(nil), body...)
		go pg.echo(src, dst, req)
	}
	return true
}

func addr(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

// echo pings dst with the request's payload and, when dst answers in time, hands the peer a reply
// with the peer's own identifier and sequence number.
func (pg *pinger) echo(src, dst netip.Addr, req []byte) {
	network, proto := "udp4", 1
	var typ icmp.Type = ipv4.ICMPTypeEcho
	if dst.Is6() {
		network, proto, typ = "udp6", 58, ipv6.ICMPTypeEchoRequest
	}
	c, err := icmp.ListenPacket(network, "")
	if err != nil {
		return
	}
	defer c.Close()
	id, seq := int(req[4])<<8|int(req[5]), int(req[6])<<8|int(req[7])
	data := req[8:]
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: data}}
	wb, err := msg.Marshal(nil)
	if err != nil {
		return
	}
	_ = c.SetDeadline(time.Now().Add(echoTimeout))
	if _, err := c.WriteTo(wb, &net.UDPAddr{IP: dst.AsSlice()}); err != nil {
		return
	}
	rb := make([]byte, 65536)
	for {
		n, _, err := c.ReadFrom(rb)
		if err != nil {
			return
		}
		m, err := icmp.ParseMessage(proto, rb[:n])
		if err != nil {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && (m.Type == ipv4.ICMPTypeEchoReply || m.Type == ipv6.ICMPTypeEchoReply) && e.Seq == seq {
			break
		}
	}
	pg.out <- echoReply(dst, src, req)
}

// echoReply is the IP packet from -> to answering the echo request req (ICMP header and data).
func echoReply(from, to netip.Addr, req []byte) []byte {
	if from.Is4() {
		b := make([]byte, header.IPv4MinimumSize+len(req))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(from.As4()), DstAddr: tcpip.AddrFrom4(to.As4())})
		ip.SetChecksum(^ip.CalculateChecksum())
		ic := header.ICMPv4(b[header.IPv4MinimumSize:])
		copy(ic, req)
		ic.SetType(header.ICMPv4EchoReply)
		ic.SetCode(0)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(ic, 0))
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+len(req))
	ip := header.IPv6(b)
	ip.Encode(&header.IPv6Fields{PayloadLength: uint16(len(req)), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: tcpip.AddrFrom16(from.As16()), DstAddr: tcpip.AddrFrom16(to.As16())})
	ic := header.ICMPv6(b[header.IPv6MinimumSize:])
	copy(ic, req)
	ic.SetType(header.ICMPv6EchoReply)
	ic.SetCode(0)
	ic.SetChecksum(0)
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic[:header.ICMPv6EchoMinimumSize],
		Src: tcpip.AddrFrom16(from.As16()), Dst: tcpip.AddrFrom16(to.As16()),
		PayloadCsum: checksum.Checksum(ic[header.ICMPv6EchoMinimumSize:], 0), PayloadLen: len(ic) - header.ICMPv6EchoMinimumSize}))
	return b
}
