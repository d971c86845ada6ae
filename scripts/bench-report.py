#!/usr/bin/env python3
"""Prints the benchmark tables: criterion results (each hot path beside the primitives that
bound it, measured in the same run) and, if given, the load harness's JSON (each figure beside
the baseline HTTP handler's, and the durable-append baseline's, on the same request stream).

    scripts/bench-report.py [--criterion DIR] [--load FILE.json] [--rebuild-target-s 20]
        [--kafka-load FILE.json --kafka-perf FILE.json [--kafka-machine FILE.txt]]

DIR defaults to $CARGO_TARGET_DIR/criterion. Only ratios between figures of one run mean
anything on a shared machine; absolute numbers are printed for scale.
"""
import argparse
import json
import os
import sys
from pathlib import Path


def load_criterion(root):
    """full_id -> (mean seconds per iteration, elements per iteration or None)."""
    out = {}
    for bench in root.rglob("new/benchmark.json"):
        est = bench.parent / "estimates.json"
        if not est.exists():
            continue
        b = json.loads(bench.read_text())
        e = json.loads(est.read_text())
        thr = b.get("throughput") or {}
        elements = thr.get("Elements") if isinstance(thr, dict) else None
        out[b["full_id"]] = (e["mean"]["point_estimate"] / 1e9, elements)
    return out


def fmt_rate(x):
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.0f} /s"


def fmt_time(s):
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def criterion_tables(c):
    lines = []
    t = lambda k: c[k][0] if k in c else None

    lines.append("### Verify + split + normalize, per provider (one core)\n")
    lines.append(
        "| bench | time/request | events/s | primitives on the same bytes | primitive floor | share of floor |"
    )
    lines.append("|---|---|---|---|---|---|")
    rows = []
    for n in (1, 100, 1000):
        rows.append((
            f"sendgrid batch {n}", f"sendgrid/verify_normalize/{n}", n,
            [("ECDSA P-256 verify", "sendgrid/primitive_ecdsa_p256_verify"),
             ("JSON→Value", f"sendgrid/primitive_json_value/{n}")],
        ))
    rows.append(("mailgun single", "mailgun/verify_normalize/1", 1,
                 [("HMAC-SHA256", "mailgun/primitive_hmac_sha256"),
                  ("JSON→Value", "mailgun/primitive_json_value/1")]))
    rows.append(("mailjet single", "mailjet/verify_normalize/1", 1,
                 [("JSON→Value", "mailjet/primitive_json_value/1")]))
    rows.append(("ses single (SNS)", "ses/verify_normalize/1", 1,
                 [("RSA-2048 verify", "ses/primitive_rsa2048_verify"),
                  ("JSON→Value", "ses/primitive_json_value/1")]))
    for name, key, n, prims in rows:
        m = t(key)
        if m is None:
            continue
        ps = [(pn, t(pk)) for pn, pk in prims if t(pk) is not None]
        floor = sum(p for _, p in ps)
        plist = ", ".join(f"{pn} {fmt_time(p)}" for pn, p in ps)
        lines.append(
            f"| {name} | {fmt_time(m)} | {fmt_rate(n / m)} | {plist} | {fmt_rate(n / floor)} events/s | **{floor / m:.0%}** |"
        )
    lines.append(
        "\n*primitive floor*: events/s if a request cost only the listed primitives (sum of their "
        "times); *share of floor* = floor time / measured time (100% = nothing but the primitives).\n"
    )

    lines.append("### Codec, fold and log\n")
    lines.append("| bench | time/iter | rate | compared with | its time | ratio |")
    lines.append("|---|---|---|---|---|---|")
    pairs = [
        ("sendgrid/primitive_ecdsa_p256_verify", "RustCrypto `p256` verify (same message)", "sendgrid/reference_p256_rustcrypto_verify"),
        ("ses/primitive_rsa2048_verify", "RustCrypto `rsa` verify (same string)", "ses/reference_rsa2048_rustcrypto_verify"),
        ("avro/encode_event/1000", "apache-avro encode (same records)", "avro/apache_encode_event/1000"),
        ("avro/decode_event/1000", "apache-avro decode (same bytes)", "avro/apache_decode_event/1000"),
        ("fold/apply/1000", "Avro encode of the same events", "fold/primitive_avro_encode/1000"),
        ("projection/apply/1000", "bare SQLite rows it implies (seen + dispatch, same indexes)", "projection/primitive_sqlite_rows/1000"),
        ("log/append_concurrent_64", "bare SQLite: 64 inserts, 1 commit", "log/primitive_sqlite_insert_64"),
    ]
    for key, what, pk in pairs:
        if key not in c:
            continue
        m, el = c[key]
        p = t(pk)
        rate = fmt_rate(el / m) if el else ""
        ratio = f"**{p / m:.2f}×** of its speed" if p else ""
        lines.append(f"| {key} | {fmt_time(m)} | {rate} | {what} | {fmt_time(p) if p else ''} | {ratio} |")
    lines.append("")
    return "\n".join(lines)


def load_tables(r, rebuild_target):
    lines = []
    m = r.get("machine", {})
    lines.append(f"### Load harness ({m.get('nproc')} CPUs, {m.get('cpu')}; generator on the same machine)\n")
    phases = r["phases"]
    base = {p["phase"]: p for p in phases if p["target"] == "baseline"}
    durable = {p["phase"]: p for p in phases if p["target"] == "durable_baseline"}

    def share(p, of, bold=True):
        """p's request rate as a share of the same phase on the baseline `of` ("" for itself)."""
        b = of.get(p["phase"])
        if p["target"] == "baseline" or b is None or b is p or not b["requests_per_s"]:
            return ""
        r = f"{p['requests_per_s'] / b['requests_per_s']:.0%}"
        return f"**{r}**" if bold else r

    lines.append(
        "| target | phase | req/s | events/s | vs baseline req/s | vs durable baseline req/s | p50 ms | p99 ms | p99.9 ms | errors | server cores | generator cores | whole machine cores |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        vs = share(p, base)
        vs_durable = share(p, durable, bold=False)
        lines.append(
            f"| {p['target']} | {p['phase']} | {p['requests_per_s']:.0f} | {p['events_per_s']:.0f} | {vs} | {vs_durable} | "
            f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['p999_ms']:.2f} | {p['errors']} | "
            f"{p['server_cores']:.2f} | {p['client_cores']:.2f} | "
            + (f"{p['machine_cores']:.2f} |" if "machine_cores" in p else " |")
        )
    lines.append("")
    vis = [p for p in phases if p.get("visible_samples")]
    if vis:
        lines.append("| phase | visible in read API after the 2xx: p50 | p99 | max | samples |")
        lines.append("|---|---|---|---|---|")
        ms = lambda v: "not visible within 30 s" if v is None else f"{v:.0f} ms"
        for p in vis:
            lines.append(
                f"| {p['target']} {p['phase']} | {ms(p['visible_p50_ms'])} | {ms(p['visible_p99_ms'])} | "
                f"{ms(p['visible_max_ms'])} | {p['visible_samples']} |"
            )
        lines.append("")
    soak = [p for p in phases if p["phase"] == "mix_soak"]
    for p in soak:
        lines.append(
            f"Soak ({p['seconds']:.0f} s at {p['requests_per_s']:.0f} req/s): server RSS "
            f"{p['rss_start_mib']:.0f} MiB at start, {p['rss_end_mib']:.0f} MiB at end, max "
            f"{p['rss_max_mib']:.0f} MiB."
        )
    if r.get("server_vm_hwm_mib") is not None:
        lines.append(f"Server peak RSS over the whole run (VmHWM): **{r['server_vm_hwm_mib']:.0f} MiB**.")
    if r.get("fsync_per_s_4k"):
        lines.append(
            f"\nPrimitive under the group commit, same run, same disk: **{r['fsync_per_s_4k']:.0f} fsync/s** "
            f"after a 4 KiB append, {r['fsync_per_s_1m']:.0f} fsync/s after a 1 MiB append."
        )
    rb = r.get("rebuild")
    if rb:
        lines.append(
            f"\nRebuild (`xsender-events rebuild`) of **{rb['events']:,} logged events: {rb['seconds']:.1f} s** "
            f"({rb['events_per_s']:,.0f} events/s; target ≤ {rebuild_target} s)."
        )
        c = rb.get("compare")
        if c:
            lines.append(
                f"Same log, back to back: `{Path(c['bin']).name}` {c['seconds']:.1f} s, this build "
                f"{c['current_seconds']:.1f} s: **{c['speedup']:.2f}× faster**."
            )
    lines.append("")
    return "\n".join(lines)


def before_after(before, after):
    lines = ["### Before / after (older binary, then this build, back to back)\n",
             "| phase | before req/s | after req/s | after ÷ before | p99 before → after (ms) |",
             "|---|---|---|---|---|"]
    baselines = ("baseline", "durable_baseline")
    b = {p["phase"]: p for p in before["phases"] if p["target"] not in baselines}
    for p in after["phases"]:
        q = b.get(p["phase"])
        if p["target"] in baselines or not q or not q["requests_per_s"]:
            continue
        lines.append(
            f"| {p['phase']} | {q['requests_per_s']:.0f} | {p['requests_per_s']:.0f} | "
            f"**{p['requests_per_s'] / q['requests_per_s']:.2f}×** | {q['p99_ms']:.0f} → {p['p99_ms']:.0f} |"
        )
    hb, ha = before.get("server_vm_hwm_mib"), after.get("server_vm_hwm_mib")
    if hb and ha:
        lines.append(f"\nServer peak RSS (VmHWM) over these runs: before {hb:.0f} MiB, after {ha:.0f} MiB.")
    lines.append("")
    return "\n".join(lines)


def kafka_ceiling(sg, perf, embedded, criterion):
    """What this machine allows the SendGrid-100 ratio at best, from the same run's figures: a
    server that did nothing but verify each request and hand its record to Kafka's own producer
    would still share the cores with the generator that builds and signs the requests and with
    the producer's and broker's work per record. None if a figure is missing."""
    base = next((p for p in (embedded or {}).get("phases", [])
                 if p["target"] == "baseline" and p["phase"] == "sendgrid_100"), None)
    verify = (criterion or {}).get("sendgrid/primitive_ecdsa_p256_verify")
    nproc = (embedded or {}).get("machine", {}).get("nproc")
    if not (base and base["requests_per_s"] and verify and nproc and perf["records_per_s"]):
        return None
    gen_us = base["client_cores"] / base["requests_per_s"] * 1e6
    log_us = (perf["producer_cores"] + perf["broker_cores"]) / perf["records_per_s"] * 1e6
    verify_us = verify[0] * 1e6
    req_s = nproc / ((gen_us + log_us + verify_us) / 1e6)
    raw = perf["records_per_s"] * perf["events_per_record"]
    ceiling = req_s * perf["events_per_record"]
    return (
        f"\n**What this machine allows, same run.** Per SendGrid-100 request the generator spends "
        f"{gen_us:.0f} µs of CPU building and signing it (its cores ÷ req/s against the baseline "
        f"handler), Kafka's producer and broker {log_us:.0f} µs per record of this size "
        f"(ProducerPerformance: (producer + broker cores) ÷ records/s) and one ECDSA P-256 "
        f"verification {verify_us:.0f} µs (criterion). A server that did nothing else would still need "
        f"{gen_us + log_us + verify_us:.0f} µs of the machine's {nproc} cores per request: at most "
        f"{req_s:,.0f} req/s = {ceiling:,.0f} events/s = **{ceiling / raw:.0%} of ProducerPerformance's "
        f"rate** with the generator on this machine (the target asks 50 %); "
        f"`serve` with all three stages reached **{sg['events_per_s'] / ceiling:.0%}** of that ceiling."
    )


def kafka_tables(k, perf, embedded, machine_txt, low=None, criterion=None):
    """The cluster backend (Kafka log + CQL projections) beside the embedded run, and the
    SendGrid-100 rate beside Kafka's own ProducerPerformance on the same node. `low`: the mix
    at a fixed low rate on the fresh server, run first."""
    lines = ["### Cluster backend: Kafka log + CQL projections (same run, private Kafka node)\n"]
    if machine_txt:
        lines += ["```", machine_txt.strip(), "```", ""]
    kp = [dict(p, phase=f"mix_at_{p['requests_per_s']:.0f}_req_s (fixed rate, first)")
          for p in (low or {}).get("phases", []) if p["target"] != "baseline"]
    kp += [p for p in k["phases"] if p["target"] != "baseline"]
    emb = {p["phase"]: p for p in (embedded or {}).get("phases", []) if p["target"] == "embedded"}
    base = {p["phase"]: p for p in (embedded or {}).get("phases", []) if p["target"] == "baseline"}
    ms = lambda v: "not visible within 30 s" if v is None else f"{v:.0f} ms"
    if emb:
        lines.append("Beside the embedded default (same `scripts/bench.sh` run, minutes apart):\n")
        lines.append("| phase | embedded events/s | Kafka + CQL events/s | Kafka ÷ embedded | Kafka vs baseline req/s "
                     "| p99 ms embedded → Kafka | visible p50 / p99 embedded | visible p50 / p99 Kafka |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for p in kp:
            e, b = emb.get(p["phase"]), base.get(p["phase"])
            ratio = f"**{p['events_per_s'] / e['events_per_s']:.2f}×**" if e and e["events_per_s"] else ""
            vsb = f"{p['requests_per_s'] / b['requests_per_s']:.0%}" if b and b["requests_per_s"] else ""
            ev = lambda x: f"{ms(x['visible_p50_ms'])} / {ms(x['visible_p99_ms'])}" if x and x.get("visible_samples") else ""
            lines.append(
                f"| {p['phase']} | {e['events_per_s']:.0f} | {p['events_per_s']:.0f} | {ratio} | {vsb} | "
                f"{e['p99_ms']:.1f} → {p['p99_ms']:.1f} | {ev(e)} | {ev(p)} |" if e else
                f"| {p['phase']} |  | {p['events_per_s']:.0f} |  | {vsb} | {p['p99_ms']:.1f} |  | {ev(p)} |")
        lines.append("")
    steal = lambda p: f" (+{p['machine_steal_cores']:.2f} steal)" if p.get("machine_steal_cores", 0) >= 0.01 else ""
    # Busy cores not ours: other tenants' processes, and kernel work not charged to a process.
    rest = lambda p: p.get("machine_cores", 0) - p["server_cores"] - p["client_cores"] - sum(p.get("aux_cores", {}).values())
    aux_names = sorted({n for p in kp for n in p.get("aux_cores", {})})
    lines.append("| phase | req/s | events/s | p50 ms | p99 ms | p99.9 ms | errors | server cores | "
                 + "".join(f"{n} cores | " for n in aux_names)
                 + "generator cores | whole machine cores | rest of the machine | projections caught up, after the load stopped |")
    lines.append("|---" * (12 + len(aux_names)) + "|")
    for p in kp:
        settled = p.get("settled_after_s")
        st = "" if settled is None else (f"{settled:.1f} s" if p.get("settled") else f"not within {settled:.0f} s")
        lines.append(
            f"| {p['phase']} | {p['requests_per_s']:.0f} | {p['events_per_s']:.0f} | {p['p50_ms']:.2f} | "
            f"{p['p99_ms']:.2f} | {p['p999_ms']:.2f} | {p['errors']} | {p['server_cores']:.2f} | "
            + "".join(f"{p.get('aux_cores', {}).get(n, 0):.2f} | " for n in aux_names)
            + f"{p['client_cores']:.2f} | {p.get('machine_cores', 0):.2f}{steal(p)} | {rest(p):.2f} | {st} |"
        )
    lines.append("")
    vis = [p for p in kp if p.get("visible_samples")]
    if vis:
        lines.append("| Kafka + CQL phase | visible in read API after the 2xx: p50 | p99 | max | "
                     "from the webhook's send (due) time: p50 | p99 | samples |")
        lines.append("|---|---|---|---|---|---|---|")
        for p in vis:
            lines.append(
                f"| {p['phase']} | {ms(p['visible_p50_ms'])} | {ms(p['visible_p99_ms'])} | {ms(p['visible_max_ms'])} | "
                f"{ms(p.get('visible_in_p50_ms'))} | {ms(p.get('visible_in_p99_ms'))} | {p['visible_samples']} |"
            )
        lines.append("")
    for p in kp:
        if p["phase"] == "mix_soak":
            lines.append(
                f"Soak on Kafka + CQL ({p['seconds']:.0f} s at {p['requests_per_s']:.0f} req/s): `serve` RSS "
                f"{p['rss_start_mib']:.0f} MiB at start, {p['rss_end_mib']:.0f} MiB at end, max "
                f"{p['rss_max_mib']:.0f} MiB."
            )
    if k.get("server_vm_hwm_mib") is not None:
        lines.append(f"`serve` peak RSS over the cluster run (VmHWM): **{k['server_vm_hwm_mib']:.0f} MiB** "
                     "(the Kafka broker and Cassandra are separate processes).")
    lines.append("")
    if perf:
        lines.append("#### The log's limit: Kafka's ProducerPerformance on the same node, same run\n")
        lines.append(
            f"Records of **{perf['record_bytes']:,.0f} B**: the Kafka record ingress writes for a SendGrid "
            f"batch of 100 (Avro `RawEnvelope` {perf['avro_value_bytes']:,.0f} B around a "
            f"{perf['body_bytes']:,.0f} B body, plus key and headers), payloads cut from the generator's "
            f"own bodies so they compress like ours; producer settings as `src/log/kafka/mod.rs` "
            f"`producer()`: `{' '.join(perf['producer_props'])}`; random keys over the 12 partitions of a "
            f"copy of the envelopes topic. {perf['records']:,} records, the first {perf['warmup_records']:,} "
            f"as warm-up, after a {perf['probe']['records']:,}-record JVM warm-up run; before `serve` started (the machine Kafka's and its producer's alone).\n"
        )
        lines.append("| records/s | MB/s | = SendGrid events/s | avg latency | p99 latency | broker cores | producer cores | whole machine cores | rest of the machine |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        p99 = f"{perf['p99_ms']} ms" if "p99_ms" in perf else ""
        lines.append(
            f"| {perf['records_per_s']:,.0f} | {perf['mb_per_s']:.1f} | {perf['events_per_s']:,.0f} | "
            f"{perf['avg_latency_ms']:.0f} ms | {p99} | {perf['broker_cores']:.2f} | {perf['producer_cores']:.2f} | "
            f"{perf['machine_cores']:.2f}{steal(perf)} | "
            f"{perf['machine_cores'] - perf['broker_cores'] - perf['producer_cores']:.2f} |"
        )
        sg = next((p for p in kp if p["phase"] == "sendgrid_100"), None)
        if sg:
            raw = perf["records_per_s"] * perf["events_per_record"]
            lines.append(
                f"\nSendGrid-100 events/s accepted on Kafka ÷ (ProducerPerformance records/s × "
                f"{perf['events_per_record']} events per record) = {sg['events_per_s']:,.0f} ÷ {raw:,.0f} = "
                f"**{sg['events_per_s'] / raw:.0%}** (target ≥ 50 %)."
            )
            ceiling = kafka_ceiling(sg, perf, embedded, criterion)
            if ceiling:
                lines.append(ceiling)
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    ap.add_argument("--criterion", default=os.path.join(target, "criterion"))
    ap.add_argument("--load")
    ap.add_argument("--rebuild-target-s", default=20)
    ap.add_argument("--load-before", help="load JSON of an older binary (same session)")
    ap.add_argument("--load-after", help="load JSON of this build, run right after --load-before")
    ap.add_argument("--kafka-load", help="load JSON of the run against Kafka + CQL")
    ap.add_argument("--kafka-low", help="load JSON of the fixed low-rate run against Kafka + CQL")
    ap.add_argument("--kafka-perf", help="ProducerPerformance JSON (same node, same run)")
    ap.add_argument("--kafka-machine", help="load averages around the cluster phase")
    a = ap.parse_args()
    out = []
    root = Path(a.criterion)
    c = load_criterion(root) if root.exists() else {}
    if c:
        out.append(criterion_tables(c))
    else:
        print(f"no criterion results under {root}", file=sys.stderr)
    if a.load:
        out.append(load_tables(json.loads(Path(a.load).read_text()), a.rebuild_target_s))
    if a.load_before and a.load_after:
        out.append(before_after(json.loads(Path(a.load_before).read_text()),
                                json.loads(Path(a.load_after).read_text())))
    if a.kafka_load:
        out.append(kafka_tables(
            json.loads(Path(a.kafka_load).read_text()),
            json.loads(Path(a.kafka_perf).read_text()) if a.kafka_perf else None,
            json.loads(Path(a.load).read_text()) if a.load else None,
            Path(a.kafka_machine).read_text() if a.kafka_machine else None,
            json.loads(Path(a.kafka_low).read_text()) if a.kafka_low and Path(a.kafka_low).exists() else None,
            c,
        ))
    print("\n".join(out))


if __name__ == "__main__":
    main()
