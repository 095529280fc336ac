package main

import (
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/device"
)

// greetPeers starts a handshake with every peer that has an endpoint but no session yet, once per
// endpoint: wireguard-go itself waits until it has a packet for the peer. A dataplane restarted
// with its peers' last endpoints (the reconciler remembers them) is then reachable at once, instead
// of when the peer's own timers notice (~15 s).
func greetPeers(dev *device.Device, done <-chan struct{}) {
	greeted := map[string]string{} // public key -> endpoint greeted
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		state, err := dev.IpcGet()
		if err != nil {
			continue
		}
		for _, p := range parsePeers(state) {
			if p.endpoint == "" || p.handshake || greeted[p.key] == p.endpoint {
				continue
			}
			var pk device.NoisePublicKey
			if pk.FromHex(p.key) != nil {
				continue
			}
			if peer := dev.LookupPeer(pk); peer != nil {
				_ = peer.SendHandshakeInitiation(false)
				greeted[p.key] = p.endpoint
			}
		}
	}
}

type uapiPeer struct {
	key       string // hex
	endpoint  string
	handshake bool // a handshake has completed
}

// parsePeers reads the peers out of a UAPI "get" answer (key=value lines, each peer starting at
// its public_key).
func parsePeers(state string) []uapiPeer {
	var peers []uapiPeer
	for _, line := range strings.Split(state, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		switch {
		case k == "public_key":
			peers = append(peers, uapiPeer{key: v})
		case len(peers) == 0:
		case k == "endpoint":
			peers[len(peers)-1].endpoint = v
		case k == "last_handshake_time_sec":
			peers[len(peers)-1].handshake = v != "0"
		}
	}
	return peers
}
