package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
)

// dataplane.json as the renderer writes it (appliance/dataplane/config.py is the one definition):
// every field, decoded with unknown fields refused, so a renderer and a netstack that disagree fail
// at once. Keys and peers reach this program through the UAPI socket, set by the launcher, so a
// private key never passes through this file (only the paths the launcher reads keys from).
type dataplaneFile struct {
	Schema    int    `json:"schema"`
	Name      string `json:"name"`
	Mode      string `json:"mode"`
	Wireguard struct {
		Implementation string   `json:"implementation"`
		Interface      string   `json:"interface"`
		ListenPort     int      `json:"listen_port"`
		MTU            int      `json:"mtu"`
		Addresses      []string `json:"addresses"`
		PrivateKeyFile string   `json:"private_key_file"`
		Peers          []struct {
			Name                string   `json:"name"`
			PublicKey           string   `json:"public_key"`
			AllowedIPs          []string `json:"allowed_ips"`
			Endpoint            *string  `json:"endpoint"`
			PersistentKeepalive *int     `json:"persistent_keepalive"`
			PresharedKeyFile    *string  `json:"preshared_key_file"`
		} `json:"peers"`
	} `json:"wireguard"`
	Routing struct {
		Table        int `json:"table"`
		RulePriority int `json:"rule_priority"`
		Routes       []struct {
			Destination string `json:"destination"`
			Device      string `json:"device"`
		} `json:"routes"`
	} `json:"routing"`
	Interfaces map[string]struct {
		Match struct {
			Name string `json:"name"`
			MAC  string `json:"mac"`
		} `json:"match"`
		Group   int             `json:"group"`
		Offload map[string]bool `json:"offload"`
	} `json:"interfaces"`
	Sysctl map[string]string `json:"sysctl"`
	Socks5     string `json:"socks5"`
	Socks5Auth *struct {
		User               string `json:"user"`
		PasswordCredential string `json:"password_credential"`
	} `json:"socks5_auth"`
	Firewall struct {
		ShieldsUp bool   `json:"shields_up"`
		Table     string `json:"table"`
	} `json:"firewall"`
	Filter []struct {
		Sources     []string `json:"sources"`
		Destination string   `json:"destination"`
		Except      []string `json:"except"`
		Proto       string   `json:"proto"`
		Ports       [][2]int `json:"ports"`
	} `json:"filter"`
	Services []service `json:"services"`
}

type rule struct {
	sources []netip.Prefix // empty: any peer
	dst     netip.Prefix
	except  []netip.Prefix // destinations left out (block_local_networks)
	proto   string         // tcp, udp, icmp, any
	ports   [][2]int
}

// service is one of the appliance's own services that peers may reach on its tunnel address.
type service struct {
	Proto   string `json:"proto"`
	Port    uint16 `json:"port"`
	Address string `json:"address"` // where it listens on the host; empty: loopback
}

// policy is the userspace counterpart of the kernel mode's forward_from_peers and
// input_from_peers chains, rendered from the same profile rules.
type policy struct {
	own       []netip.Addr   // the appliance's tunnel addresses
	tunnel    []netip.Prefix // peers' allowed IPs: flows there never leave through the host
	rules     []rule
	services  []service // own services peers reach (relayed to loopback); none with shields up
	shieldsUp bool
	local     localAddrs
}

type config struct {
	iface      string
	mtu        int
	socks5     string
	socks5User string
	socks5Pass string // empty: no authentication (a proxy on loopback)
	own        []netip.Prefix
	policy     policy
}

func loadConfig(path string) (*config, error) {
	raw, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	var f dataplaneFile
	dec := json.NewDecoder(raw)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if f.Schema != 1 || (f.Mode != "userspace" && !checkOnly) {
		return nil, fmt.Errorf("%s: schema %d, mode %q: not a userspace dataplane config this version reads", path,
			f.Schema, f.Mode)
	}
	c := &config{iface: f.Wireguard.Interface, mtu: f.Wireguard.MTU, socks5: f.Socks5}
	c.policy.shieldsUp = f.Firewall.ShieldsUp
	// the renderer lists only what peers may reach: SSH unless shields are up, the resolver always
	c.policy.services = f.Services
	if f.Socks5Auth != nil && !checkOnly {
		pass, err := readCredential(f.Socks5Auth.PasswordCredential)
		if err != nil {
			return nil, fmt.Errorf("%s: socks5 password: %w", path, err)
		}
		c.socks5User, c.socks5Pass = f.Socks5Auth.User, pass
	}
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
		for _, e := range r.Except {
			p, err := netip.ParsePrefix(e)
			if err != nil {
				return nil, fmt.Errorf("%s: filter exception %q: %w", path, e, err)
			}
			out.except = append(out.except, p.Masked())
		}
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

// readCredential reads a secret systemd handed over (LoadCredential=): never from dataplane.json.
func readCredential(name string) (string, error) {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" || name == "" {
		return "", fmt.Errorf("no credential %q (CREDENTIALS_DIRECTORY is not set)", name)
	}
	raw, err := os.ReadFile(dir + "/" + name)
	if err != nil {
		return "", err
	}
	pass := string(trimSpace(raw))
	if pass == "" {
		return "", fmt.Errorf("credential %q is empty", name)
	}
	return pass, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// isAppliance says whether dst is the appliance itself: its tunnel addresses, any address of the
// host's interfaces (the LAN's, the uplink's: with shields up, none of them is a way in), loopback
// and the unspecified address (which reaches the host too).
func (p *policy) isAppliance(dst netip.Addr) bool {
	return p.isOwn(dst) || dst.IsLoopback() || dst.IsUnspecified() || p.local.has(dst)
}

// serves says where on the host peers reach the appliance's own service proto/port: its address
// (empty: loopback), and false when the profile does not offer it.
func (p *policy) serves(proto string, port uint16) (string, bool) {
	for _, s := range p.services {
		if s.Proto == proto && s.Port == port {
			return s.Address, true
		}
	}
	return "", false
}

// localAddrs is the host's own addresses, read again when older than a second (a DHCP lease may
// change the uplink's at any time).
type localAddrs struct {
	mu    sync.Mutex
	read  time.Time
	addrs map[netip.Addr]bool
}

func (l *localAddrs) has(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.addrs == nil || time.Since(l.read) > time.Second {
		l.addrs = map[netip.Addr]bool{}
		l.read = time.Now()
		if found, err := net.InterfaceAddrs(); err == nil {
			for _, f := range found {
				if n, ok := f.(*net.IPNet); ok {
					if ip, ok := netip.AddrFromSlice(n.IP); ok {
						l.addrs[ip.Unmap()] = true
					}
				}
			}
		}
	}
	return l.addrs[a]
}

// forward says whether a peer (src) may reach dst off the appliance: the first rule that matches
// admits, nothing else does.
func (p *policy) forward(proto string, src, dst netip.Addr, port uint16) bool {
	if p.inTunnel(dst) || p.isAppliance(dst) {
		return false
	}
	for _, r := range p.rules {
		if !r.dst.Contains(dst) || containsAny(r.except, dst) {
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
