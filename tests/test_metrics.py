"""The metrics endpoint's text: Prometheus' own parser reads it, the private key on the dump's first
line never gets into it, labels are escaped. (The boot lab scrapes a real appliance after traffic;
test_dataplane_kernel reads a real wireguard-go.)"""

from __future__ import annotations

import json
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from appliance.dataplane.config import DataplaneConfig
from appliance.dataplane.metrics import collect, parse_dump
from appliance.profile import load_profile
from appliance.render import DATAPLANE_JSON, render
from appliance.secrets import ApplianceKeys, generate_private_key
from conftest import PROFILES

PRIVATE = "cGxlYXNlIG5ldmVyIHByaW50IG1lLCBJIGFtIHNlY3JldCE="


def _config() -> DataplaneConfig:
    p = load_profile(PROFILES / "exit-node.yaml").profile
    text = render(p, ApplianceKeys(generate_private_key(), {"phone": generate_private_key()})).text(DATAPLANE_JSON)
    return DataplaneConfig.from_json(json.loads(text))


def test_scrape_parses_and_holds_no_key() -> None:
    cfg = _config()
    laptop, phone = cfg.wireguard.peers[0], cfg.wireguard.peers[1]
    dump = (f"{PRIVATE}\tPUBLICKEY=\t51820\toff\n"
            f"{laptop.public_key}\t(none)\t198.51.100.7:4242\t100.64.0.2/32\t1764000000\t1234\t5678\t25\n"
            f"{phone.public_key}\t(none)\t(none)\t100.64.0.3/32\t0\t0\t0\toff\n")

    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        out = dump if cmd[:2] == ["wg", "show"] else ("[]" if cmd[:2] == ["ip", "-j"] else "")
        return subprocess.CompletedProcess(cmd, 0, out, "")

    text = collect(cfg, fake)
    assert PRIVATE not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["wireguard_peer_last_handshake_timestamp_seconds"].samples
    handshakes = {s.labels["peer"]: s.value for s in samples}
    assert handshakes == {laptop.name: 1764000000, phone.name: 0}
    received = {s.labels["peer"]: s.value for s in families["wireguard_peer_received_bytes"].samples}
    assert received[laptop.name] == 1234 and families["wireguard_peer_sent_bytes"].type == "counter"
    assert families["appliance_info"].samples[0].labels["mode"] == "kernel"


def test_dump_parsing_skips_the_interface_line() -> None:
    assert parse_dump(f"{PRIVATE}\tpub\t51820\toff\n") == []
    (peer,) = parse_dump("k\tline\n" + "pk\t(none)\t(none)\t10.0.0.2/32\t5\t6\t7\toff\n")
    assert (peer.public_key, peer.latest_handshake, peer.rx_bytes, peer.tx_bytes) == ("pk", 5, 6, 7)


def test_dump_parsing_of_all_interfaces() -> None:
    """`wg show all dump` (what `appliance status` reads): each line led by its interface, whose own
    line (private key, public key, port, fwmark) is no peer."""
    peers = parse_dump(f"wg0\t{PRIVATE}\tpub\t51820\toff\n" + "wg0\tpk\t(none)\t1.2.3.4:5\t10.0.0.2/32\t5\t6\t7\t25\n")
    assert [(p.interface, p.public_key, p.latest_handshake, p.rx_bytes, p.tx_bytes) for p in peers] == [
        ("wg0", "pk", 5, 6, 7)]
