"""Tables and JSON of benches/peers/run.sh from the raw records it wrote into its results directory.

Usage: report.py RES PRESET SIZE RUNS SEED CLK_TCK UPTIME_BEFORE UPTIME_AFTER JSON_OUT
Prints Markdown to standard output and writes the JSON file. MB = 10^6 bytes, MiB = 2^20 bytes.
"""

import json
import os
import sys

NCPU = os.cpu_count()
STORES = ["artifactfs-mount", "artifactfs-ingest", "restic", "borg", "casync"]
PEERS = ["restic", "borg", "casync"]
LIMITS = ["cp-a", "b3sum", "zstd-1", "zstd-3"]


def lines(path):
    return [l.split() for l in open(path).read().splitlines() if l.strip()] if os.path.exists(path) else []


def timing(fields, tck):
    """wall user sys maxrss_kib b0 t0 b1 t1 -> dict."""
    wall, user, sys_, rss = float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])
    b0, t0, b1, t1 = (int(x) for x in fields[4:8])
    cpu = user + sys_
    machine = (b1 - b0) / (t1 - t0) * NCPU if t1 > t0 else 0.0
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_kib": rss, "machine_busy_cores": machine}


def others(t):
    return max(0.0, t["machine_busy_cores"] - (t["cpu_s"] / t["wall_s"] if t["wall_s"] > 0 else 0.0))


def mbs(nbytes, wall):
    return nbytes / 1e6 / wall if wall > 0 else None


def main():
    res, preset, size, runs, seed, tck, up0, up1, json_out = sys.argv[1:10]
    runs, tck = int(runs), int(tck)
    run_bytes = {int(i): int(b) for i, b, _ in lines(f"{res}/runs")}
    run_files = {int(i): int(f) for i, _, f in lines(f"{res}/runs")}
    last = max(run_bytes)
    cache = open(f"{res}/cache_state").read().strip()

    ingest = {}
    for f in lines(f"{res}/ingest"):
        ingest.setdefault(f[0], {})[int(f[1])] = timing(f[2:], tck)
    # The mount's own CPU and peak RSS join those of cp and seal.
    for i, ticks, hwm in lines(f"{res}/mount_proc"):
        t = ingest["artifactfs-mount"][int(i)]
        t["client_cpu_s"] = t["cpu_s"]
        t["mount_cpu_s"] = int(ticks) / tck
        t["cpu_s"] += t["mount_cpu_s"]
        t["client_peak_rss_kib"] = t["peak_rss_kib"]
        t["peak_rss_kib"] = max(t["peak_rss_kib"], int(hwm))
    stored = {t: int(b) for t, b in lines(f"{res}/stored")}
    verified = {t: v for t, v in lines(f"{res}/verified")}
    restore = {f[0]: timing(f[1:], tck) for f in lines(f"{res}/restore")}
    mread = {f[0]: timing(f[1:], tck) for f in lines(f"{res}/mount_read")}
    for tool, tar_bytes, ticks, hwm in lines(f"{res}/mount_proc_read"):
        mread[tool].update(tar_bytes=int(tar_bytes), mount_cpu_s=int(ticks) / tck, mount_peak_rss_kib=int(hwm))

    total = sum(run_bytes.values())
    later = [i for i in run_bytes if i > 0]
    tools = {}
    for tool, per in ingest.items():
        wall = sum(t["wall_s"] for t in per.values())
        later_wall = sum(per[i]["wall_s"] for i in later)
        entry = {
            "ingest_mb_s": mbs(total, wall),
            "ingest_first_run_mb_s": mbs(run_bytes[0], per[0]["wall_s"]),
            "ingest_later_runs_mb_s": mbs(sum(run_bytes[i] for i in later), later_wall) if later else None,
            "ingest_wall_s": wall,
            "cpu_s": sum(t["cpu_s"] for t in per.values()),
            "peak_rss_mib": max(t["peak_rss_kib"] for t in per.values()) / 1024,
            "others_busy_cores_mean": sum(others(t) * t["wall_s"] for t in per.values()) / wall if wall else 0,
            "per_run": [dict(run=i, bytes=run_bytes[i], mb_s=mbs(run_bytes[i], t["wall_s"]), **t)
                        for i, t in sorted(per.items())],
        }
        if tool in stored:
            entry["stored_bytes"] = stored[tool]
            entry["stored_over_raw"] = stored[tool] / total
        if tool in restore:
            r = restore[tool]
            entry["restore"] = dict(r, mb_s=mbs(run_bytes[last], r["wall_s"]), verified=verified.get(tool))
        if tool in mread:
            m = mread[tool]
            entry["mount_read"] = dict(m, mb_s=mbs(run_bytes[last], m["wall_s"]))
        tools[tool] = entry
    source_read = mread.get("source")

    def get(tool, *path):
        v = tools.get(tool)
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    def ratio(a, b):
        return a / b if a is not None and b else None

    min_peer = min(PEERS, key=lambda p: tools[p]["stored_bytes"])
    fastest = max(PEERS, key=lambda p: get(p, "restore", "mb_s") or 0)
    ratios = []
    for afs in ["artifactfs-ingest", "artifactfs-mount"]:
        ratios += [
            (f"{afs} ingest MB/s / restic", ratio(get(afs, "ingest_mb_s"), get("restic", "ingest_mb_s")), ">=", 2),
            (f"{afs} ingest MB/s / borg", ratio(get(afs, "ingest_mb_s"), get("borg", "ingest_mb_s")), ">=", 3),
            (f"{afs} ingest MB/s / casync", ratio(get(afs, "ingest_mb_s"), get("casync", "ingest_mb_s")), None, None),
            (f"{afs} stored bytes / smallest peer ({min_peer})",
             ratio(get(afs, "stored_bytes"), get(min_peer, "stored_bytes")), "<=", 1),
        ]
    ratios += [
        ("artifactfs mount read MB/s / restic mount",
         ratio(get("artifactfs-ingest", "mount_read", "mb_s"), get("restic", "mount_read", "mb_s")), ">=", 5),
        ("artifactfs mount read MB/s / borg mount",
         ratio(get("artifactfs-ingest", "mount_read", "mb_s"), get("borg", "mount_read", "mb_s")), None, None),
        ("artifactfs mount read MB/s / casync mount",
         ratio(get("artifactfs-ingest", "mount_read", "mb_s"), get("casync", "mount_read", "mb_s")), None, None),
        (f"artifactfs export MB/s / fastest peer restore ({fastest})",
         ratio(get("artifactfs-ingest", "restore", "mb_s"), get(fastest, "restore", "mb_s")), ">=", 1),
    ]

    def met(v, op, target):
        if op is None or v is None:
            return None
        return v >= target if op == ">=" else v <= target

    doc = {
        "preset": preset, "size": size, "runs": runs, "seed": int(seed), "cores": NCPU,
        "uptime_before": up0.strip(), "uptime_after": up1.strip(), "restore_and_mount_cache": cache,
        "run_bytes": [run_bytes[i] for i in sorted(run_bytes)],
        "run_files": [run_files[i] for i in sorted(run_files)],
        "raw_bytes_total": total,
        "source_read_cold": dict(source_read, mb_s=mbs(run_bytes[last], source_read["wall_s"])) if source_read else None,
        "tools": tools,
        "ratios": [{"name": n, "value": v, "target": None if op is None else f"{op} {t}", "met": met(v, op, t)}
                   for n, v, op, t in ratios],
    }
    with open(json_out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    def fmt(v, p=1):
        return "n/a" if v is None else f"{v:.{p}f}"

    p = print
    p(f"Raw data: {runs} runs, {total / 1e6:.1f} MB in all (run 0: {run_bytes[0] / 1e6:.1f} MB, "
      f"{run_files[0]} files; last run: {run_bytes[last] / 1e6:.1f} MB). Restores and mount reads are of the last "
      f"run, {cache} (page cache dropped before each); the source tar below is the same tree read from the local disk.")
    p()
    p("| tool | ingest MB/s, all runs | run 0 MB/s | runs 1.. MB/s | CPU s, all runs | peak RSS MiB | stored MB "
      "| stored / raw | restore MB/s | mount read MB/s | others' cores during ingest |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    for tool in STORES + LIMITS:
        if tool not in tools:
            continue
        t = tools[tool]
        st = t.get("stored_bytes")
        rest = get(tool, "restore", "mb_s")
        if rest is not None and t["restore"]["verified"] != "ok":
            rest_s = f"{fmt(rest)} (differs!)"
        else:
            rest_s = fmt(rest)
        p(f"| {tool} | {fmt(t['ingest_mb_s'])} | {fmt(t['ingest_first_run_mb_s'])} | {fmt(t['ingest_later_runs_mb_s'])} "
          f"| {fmt(t['cpu_s'])} | {fmt(t['peak_rss_mib'], 0)} | {'-' if st is None else f'{st / 1e6:.1f}'} "
          f"| {'-' if st is None else f'{st / total:.3f}'} | {'-' if rest is None else rest_s} "
          f"| {fmt(get(tool, 'mount_read', 'mb_s')) if tool in mread else '-'} | {t['others_busy_cores_mean']:.2f} |")
    if source_read:
        p(f"| source (local disk, tar) | - | - | - | - | - | - | - | - | {fmt(doc['source_read_cold']['mb_s'])} | - |")
    p()
    p("| ratio (same run) | value | target | met |")
    p("|---|---|---|---|")
    for r in doc["ratios"]:
        m = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        p(f"| {r['name']} | {fmt(r['value'], 2)} | {r['target'] or ''} | {m} |")
    p()
    p("Ingest MB/s of each run:")
    p()
    p("| tool | " + " | ".join(f"run {i}" for i in sorted(run_bytes)) + " |")
    p("|---|" + "---|" * len(run_bytes))
    for tool in STORES + LIMITS:
        if tool in tools:
            p(f"| {tool} | " + " | ".join(fmt(r["mb_s"]) for r in tools[tool]["per_run"]) + " |")
    p()
    p("Restore and mount read of the last run (cold):")
    p()
    p("| tool | restore s | restore CPU s | restore peak RSS MiB | verified (diff -r) | mount read s "
      "| reader CPU s | mount process CPU s | mount peak RSS MiB |")
    p("|---|---|---|---|---|---|---|---|---|")
    for tool in ["artifactfs-ingest"] + PEERS:
        r, m = tools[tool].get("restore", {}), tools[tool].get("mount_read", {})
        p(f"| {tool} | {fmt(r.get('wall_s'), 2)} | {fmt(r.get('cpu_s'), 2)} "
          f"| {fmt(r['peak_rss_kib'] / 1024 if r else None, 0)} | {r.get('verified', 'n/a')} "
          f"| {fmt(m.get('wall_s'), 2)} | {fmt(m.get('cpu_s'), 2)} | {fmt(m.get('mount_cpu_s'), 2)} "
          f"| {fmt(m['mount_peak_rss_kib'] / 1024 if 'mount_peak_rss_kib' in m else None, 0)} |")


main()
