package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
)

// The parts of dataplane.json this program reads. Keys and peers reach it through the UAPI socket,
// set by the reconciler, so a private key never passes through this file.
type dataplaneFile struct {
	Mode      string `json:"mode"`
	Wireguard struct {
		Interface string   `json:"interface"`
		MTU       int      `json:"mtu"`
		Addresses []string `json:"addresses"`
		Peers     []struct {
			AllowedIPs []string `json:"allowed_ips"`
		} `json:"peers"`
	} `json:"wireguard"`
	Socks5   string `json:"socks5"`
	Firewall struct {
		ShieldsUp bool `json:"shields_up"`
	} `json:"firewall"`
	Filter []struct {
		Sources     []string `json:"sources"`
		Destination string   `json:"destination"`
		Proto       string   `json:"proto"`
		Ports       [][2]int `json:"ports"`
	} `json:"filter"`
}

type rule struct {
	sources []netip.Prefix // empty: any peer
	dst     netip.Prefix
	proto   string // tcp, udp, icmp, any
	ports   [][2]int
}

// policy is the userspace counterpart of the kernel mode's forward_from_peers and
// input_from_peers chains, rendered from the same profile rules.
type policy struct {
	own       []netip.Addr   // the appliance's tunnel addresses
	tunnel    []netip.Prefix // peers' allowed IPs: flows there never leave through the host
	rules     []rule
	shieldsUp bool
}

type config struct {
	iface  string
	mtu    int
	socks5 string
	own    []netip.Prefix
	policy policy
}

func loadConfig(path string) (*config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f dataplaneFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	c := &config{iface: f.Wireguard.Interface, mtu: f.Wireguard.MTU, socks5: f.Socks5}
	c.policy.shieldsUp = f.Firewall.ShieldsUp
	for _, a := range f.Wireguard.Addresses {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			return nil, fmt.Errorf("%s: wireguard address %q: %w", path, a, err)
		}
		c.own = append(c.own, p)
		c.policy.own = append(c.policy.own, p.Addr())
	}
	for _, peer := range f.Wireguard.Peers {
		for _, a := range peer.AllowedIPs {
			p, err := netip.ParsePrefix(a)
			if err != nil {
				return nil, fmt.Errorf("%s: allowed ip %q: %w", path, a, err)
			}
			c.policy.tunnel = append(c.policy.tunnel, p.Masked())
		}
	}
	for _, r := range f.Filter {
		dst, err := netip.ParsePrefix(r.Destination)
		if err != nil {
			return nil, fmt.Errorf("%s: filter destination %q: %w", path, r.Destination, err)
		}
		out := rule{dst: dst.Masked(), proto: r.Proto, ports: r.Ports}
		for _, s := range r.Sources {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("%s: filter source %q: %w", path, s, err)
			}
			out.sources = append(out.sources, p.Masked())
		}
		c.policy.rules = append(c.policy.rules, out)
	}
	if c.iface == "" || c.mtu <= 0 {
		return nil, fmt.Errorf("%s: no wireguard interface or mtu", path)
	}
	return c, nil
}

func (p *policy) isOwn(a netip.Addr) bool {
	for _, o := range p.own {
		if o == a {
			return true
		}
	}
	return false
}

func (p *policy) inTunnel(a netip.Addr) bool {
	for _, t := range p.tunnel {
		if t.Contains(a) {
			return true
		}
	}
	return false
}

// forward says whether a peer (src) may reach dst off the appliance: the first rule that matches
// admits, nothing else does.
func (p *policy) forward(proto string, src, dst netip.Addr, port uint16) bool {
	if p.inTunnel(dst) || p.isOwn(dst) {
		return false
	}
	for _, r := range p.rules {
		if !r.dst.Contains(dst) {
			continue
		}
		if len(r.sources) > 0 && !containsAny(r.sources, src) {
			continue
		}
		if r.proto != "any" && r.proto != proto {
			continue
		}
		if len(r.ports) > 0 && (proto == "tcp" || proto == "udp") && !inRanges(r.ports, port) {
			continue
		}
		return true
	}
	return false
}

func containsAny(nets []netip.Prefix, a netip.Addr) bool {
	for _, n := range nets {
		if n.Contains(a) {
			return true
		}
	}
	return false
}

func inRanges(ranges [][2]int, port uint16) bool {
	for _, r := range ranges {
		if int(port) >= r[0] && int(port) <= r[1] {
			return true
		}
	}
	return false
}
