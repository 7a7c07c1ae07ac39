#!/usr/bin/env python3
"""Turns bnorm_bench JSON into docs/performance.md and docs/img/*.svg.

    python3 bench/report.py RESULTS.json [MORE.json ...]   # writes the docs
    python3 bench/report.py --summary RESULTS.json         # a table on stdout

Several files are merged, a later file's row replacing an earlier one of the
same name (rerun only bnorm's rows with --benchmark_filter=/bnorm/ and pass the
old file first). Plots need matplotlib (Debian: python3-matplotlib); without
it the tables are still written.
"""

import argparse
import collections
import json
import math
import os
import re
import statistics
import sys

OPS = ["fwd_training", "fwd_inference", "backward",
       "fwd_training_relu", "fwd_inference_relu", "backward_relu"]
# Targets from the issue: (time / copy at most, speed-up over the faster peer
# at least), geometric means over all shapes and both layouts. The ReLU
# variants are held to their base operation's targets.
TARGETS = {"fwd_training": (1.4, 2.0), "fwd_inference": (1.15, 1.2), "backward": (2.0, 1.6)}
IMPLS = ["bnorm", "onednn", "torch"]
PEERS = ["onednn", "torch"]
LABEL = {"bnorm": "bnorm", "onednn": "oneDNN", "torch": "PyTorch", "copy": "NT copy"}
LAYOUTS = ["nchw", "nhwc"]
RESNET_LAYERS = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28),
                 (256, 14), (1024, 14), (512, 7), (2048, 7)]
BATCHES = [1, 8, 32, 128]
TWO_D_C = [256, 1024]

Row = collections.namedtuple("Row", "time_s gbs ratio copy_gbs error others")
# Rows during which other processes used more than this share of the CPUs.
DISTURBED = 0.10
# Comparisons whose speed-up over the faster peer is below this are close
# calls: bench/run_bench.sh runs their rows again (--close-filter).
CLOSE_MARGIN = 1.25
Shape = collections.namedtuple("Shape", "n c h w two_d")


def base_op(op):
    return op[:-5] if op.endswith("_relu") else op


def parse_shape(desc):
    m = re.fullmatch(r"mb(\d+)ic(\d+)(?:ih(\d+)iw(\d+))?", desc)
    if not m:
        return None
    n, c = int(m.group(1)), int(m.group(2))
    if m.group(3) is None:
        return Shape(n, c, 1, 1, True)
    return Shape(n, c, int(m.group(3)), int(m.group(4)), False)


def tensor_bytes(shape):
    return shape.n * shape.c * shape.h * shape.w * 4


def tensor_mb(shape):
    return tensor_bytes(shape) / 1e6


def traffic_and_copy_bytes(op, shape):
    """As bench/workload.cpp: forward 2S and a copy of S; backward 3S and 1.5S."""
    s = tensor_bytes(shape)
    if base_op(op) == "backward":
        return 3 * s, (3 * s // 2) // 4 * 4
    return 2 * s, s


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class Results:
    """Rows keyed by (op, layout, impl, descriptor); copy rows by byte count.

    Times are each row's best iteration (use_mean: the mean); its reference
    is the non-temporal copy of the same traffic timed just before it.
    use_paired: time/copy is instead the median over the passes of each
    pass's ratio to its own copy (paired_ratio, see best_of_json); times,
    GB/s and speed-ups stay those of the best iteration.
    """

    def __init__(self, paths, use_mean=False, use_paired=False):
        self.rows = {}
        self.copies = {}
        self.machine = {}  # (kind, bytes) -> best GB/s
        self.context = {}
        self.descs = []  # registration order
        self.files = paths
        self.use_mean = use_mean
        self.use_paired = use_paired
        raw = collections.OrderedDict()
        for path in paths:
            with open(path) as f:
                data = json.load(f)
            self.context.update(data.get("context", {}))
            raw.update(self._read(data.get("benchmarks", [])))
        self.raw = raw
        self._score(raw)

    def disturbed(self):
        """Names of rows that failed or ran next to other processes."""
        return [name for name, b in self.raw.items()
                if b.get("error_occurred") or (b.get("others_cpu") or 0) > DISTURBED]

    @staticmethod
    def _read(benchmarks):
        # Keyed by the row's name without "/manual_time". With
        # --benchmark_repetitions, keep the median aggregate.
        by_name = collections.OrderedDict()
        for b in benchmarks:
            name = b.get("run_name", b["name"]).replace("/manual_time", "")
            if b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    by_name[name] = [b]
                continue
            if name in by_name and by_name[name][0].get("run_type") == "aggregate":
                continue
            by_name.setdefault(name, []).append(b)
        out = collections.OrderedDict()
        for name, bs in by_name.items():
            out[name] = sorted(bs, key=lambda x: x.get("real_time", 0))[len(bs) // 2]
        return out

    def _score(self, raw):
        for name, b in raw.items():
            parts = name.split("/")
            error = b.get("error_message", "failed") if b.get("error_occurred") else None
            t_mean = b.get("real_time", 0) * UNIT_S.get(b.get("time_unit", "ns"), 1e-9)
            if parts[0] == "machine" and len(parts) == 3:
                self.machine[(parts[1], int(parts[2].split(":")[1]))] = b.get("best_GB/s")
                continue
            if parts[0] == "copy_nt" and len(parts) == 2:
                nbytes = int(parts[1].split(":")[1])
                self.copies[nbytes] = Row(t_mean, b.get("GB/s"), None, b.get("copy_GB/s"),
                                          error, b.get("others_cpu"))
                continue
            if len(parts) != 4 or parse_shape(parts[3]) is None:
                continue
            op, layout, impl, desc = parts
            if desc not in self.descs:
                self.descs.append(desc)
            if error:
                self.rows[(op, layout, impl, desc)] = Row(None, None, None, None, error, None)
                continue
            # The row's own reference: the copy timed just before it.
            traffic, _ = traffic_and_copy_bytes(op, parse_shape(desc))
            copy_s = traffic / (b["copy_GB/s"] * 1e9)
            t = t_mean if self.use_mean else b["best_ratio"] * copy_s
            ratio = b.get("paired_ratio", b["best_ratio"]) if self.use_paired else t / copy_s
            self.rows[(op, layout, impl, desc)] = Row(t, traffic / t * 1e-9, ratio,
                                                      b["copy_GB/s"], error, b.get("others_cpu"))

    def get(self, op, layout, impl, desc):
        r = self.rows.get((op, layout, impl, desc))
        if r is None and impl != "bnorm":
            r = self.rows.get((op, "nc", impl, desc))  # peers run 2-D input once
        if r is None or r.error:
            return None
        return r

    def close_calls(self, margin):
        """Names of the rows, bnorm's and its peers', of every comparison whose
        speed-up is below margin (bnorm slower, or faster by less)."""
        names = []
        for op in self.ops():
            for desc, layout, rows, speedup in self.entries(op):
                if speedup is None or speedup >= margin:
                    continue
                for impl in rows:
                    peer_layout = layout
                    if impl != "bnorm" and (op, layout, impl, desc) not in self.rows:
                        peer_layout = "nc"
                    name = "/".join((op, peer_layout, impl, desc))
                    if name not in names:
                        names.append(name)
        return names

    def ops(self):
        present = {k[0] for k in self.rows}
        return [op for op in OPS if op in present]

    def impls(self):
        present = {k[2] for k in self.rows if not self.rows[k].error}
        return [i for i in IMPLS if i in present]

    def entries(self, op, layouts=LAYOUTS):
        """One comparison per bnorm row: (desc, layout, {impl: Row}, speed-up)."""
        out = []
        for desc in self.descs:
            for layout in layouts:
                mine = self.get(op, layout, "bnorm", desc)
                if mine is None:
                    continue
                rows = {"bnorm": mine}
                for p in PEERS:
                    r = self.get(op, layout, p, desc)
                    if r is not None:
                        rows[p] = r
                peer_times = [rows[p].time_s for p in PEERS if p in rows]
                speedup = min(peer_times) / mine.time_s if peer_times else None
                out.append((desc, layout, rows, speedup))
        return out


def fmt(v, digits=2):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.*f" % (digits, v)


def cell(row):
    """'GB/s (time/copy)', with a dagger if other processes ran meanwhile."""
    if row is None:
        return "-"
    mark = "\u2020" if (row.others or 0) > DISTURBED else ""
    return "%s (%s)%s" % (fmt(row.gbs, 1), fmt(row.ratio), mark)


def speedup_cell(s):
    if s is None:
        return "-"
    return "**%s**" % fmt(s) if s < 1.0 else fmt(s)


# ---------------------------------------------------------------- summary

def summary_stats(res, op, layouts):
    entries = res.entries(op, layouts)
    stats = {"n": len(entries)}
    for impl in IMPLS:
        stats[impl] = geomean([rows[impl].ratio for _, _, rows, _ in entries if impl in rows])
    speedups = [s for _, _, _, s in entries if s is not None]
    stats["speedup"] = geomean(speedups)
    stats["min_speedup"] = min(speedups) if speedups else None
    stats["slower"] = sum(1 for s in speedups if s < 1.0)
    return stats


def verdict(op, stats):
    target = TARGETS.get(base_op(op))
    if target is None or stats["bnorm"] is None:
        return "-"
    ok_ratio = stats["bnorm"] <= target[0]
    ok_speed = stats["speedup"] is not None and stats["speedup"] >= target[1]
    ok_each = stats["slower"] == 0
    misses = [what for ok, what in [(ok_ratio, "ratio"), (ok_speed, "speed-up"),
                                    (ok_each, "%d slower" % stats["slower"])] if not ok]
    return "met" if not misses else "missed: " + ", ".join(misses)


def print_summary(res):
    """The --quick table: plain text, one block per operation."""
    ctx = res.context
    print("bnorm %s, %s threads, %s; GB/s of tensor traffic (time / non-temporal copy)" % (
        ctx.get("bnorm_isa", "?"), ctx.get("omp_threads", "?"), ctx.get("cpu_model", "?")))
    impls = res.impls()
    for op in res.ops():
        print()
        header = ["%-24s" % op, "%-6s" % "layout"] + ["%-15s" % LABEL[i] for i in impls]
        header.append("speed-up")
        print(" ".join(header))
        for desc, layout, rows, s in res.entries(op):
            line = ["%-24s" % desc, "%-6s" % layout]
            line += ["%-15s" % cell(rows.get(i)) for i in impls]
            line.append(fmt(s) + (" (slower)" if s is not None and s < 1 else ""))
            print(" ".join(line))
        st = summary_stats(res, op, LAYOUTS)
        line = ["%-24s" % "geomean time/copy", "%-6s" % "both"]
        line += ["%-15s" % fmt(st[i]) for i in impls]
        line.append(fmt(st["speedup"]))
        print(" ".join(line))
        target = TARGETS.get(base_op(op))
        if target:
            print("%-31s target: time/copy <= %s and speed-up >= %s: %s" % (
                "", target[0], target[1], verdict(op, st)))
    disturbed = res.disturbed()
    if disturbed:
        print("\n\u2020 %d rows ran while other processes used more than %d%% of the CPUs "
              "or failed: their numbers mean little; rerun on a quiet machine."
              % (len(disturbed), DISTURBED * 100))


# ---------------------------------------------------------------- plots

def make_plots(res, img_dir, ext="svg"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not found, no plots (apt install python3-matplotlib)",
              file=sys.stderr)
        return None
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "bnorm",
                         "font.size": 8, "axes.titlesize": 8})
    os.makedirs(img_dir, exist_ok=True)

    def save(fig, path):
        # No date in the metadata: regenerating unchanged data changes no file.
        if ext == "svg":
            fig.savefig(path, metadata={"Date": None})
        else:
            fig.savefig(path, dpi=110, metadata={"Software": None})

    colors = {"bnorm": "#d62728", "onednn": "#1f77b4", "torch": "#ff7f0e", "copy": "#7f7f7f"}
    written = {}
    impls = res.impls()
    for op in res.ops():
        for layout in LAYOUTS:
            fig, axes = plt.subplots(3, 4, figsize=(11, 7.5))
            axes = axes.ravel()
            panels = [("C %d, %dx%d" % (c, hw, hw), [(b, "mb%dic%dih%diw%d" % (b, c, hw, hw))
                                                for b in BATCHES], "batch")
                      for c, hw in RESNET_LAYERS]
            panels += [("(N, %d)" % c, [(n, "mb%dic%d" % (n, c)) for n in (256, 4096, 65536)],
                        "N") for c in TWO_D_C]
            any_data = False
            for ax, (title, points, xlabel) in zip(axes, panels):
                for impl in impls + ["copy"]:
                    xs, ys = [], []
                    for x, desc in points:
                        r = res.get(op, layout, "bnorm" if impl == "copy" else impl, desc)
                        if r is None:
                            continue
                        v = r.copy_gbs if impl == "copy" else r.gbs
                        if v:
                            xs.append(x)
                            ys.append(v)
                    if xs:
                        any_data = True
                        ax.plot(xs, ys, marker="o", markersize=3, color=colors[impl],
                                linestyle="--" if impl == "copy" else "-",
                                linewidth=1 if impl == "copy" else 1.5, label=LABEL[impl])
                ax.set_xscale("log", base=2)
                ax.set_xticks([x for x, _ in points])
                ax.set_xticklabels([str(x) for x, _ in points])
                ax.minorticks_off()
                ax.set_title(title)
                ax.set_xlabel(xlabel)
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
            for ax in axes[len(panels):]:
                ax.axis("off")
            if not any_data:
                plt.close(fig)
                continue
            axes[0].set_ylabel("GB/s")
            axes[4].set_ylabel("GB/s")
            axes[8].set_ylabel("GB/s")
            legend = {}
            for ax in axes:
                for h, label in zip(*ax.get_legend_handles_labels()):
                    legend.setdefault(label, h)
            order = [LABEL[i] for i in impls + ["copy"] if LABEL[i] in legend]
            axes[-1].legend([legend[k] for k in order], order, loc="center", frameon=False,
                            fontsize=10)
            fig.suptitle("%s, %s: tensor traffic GB/s against batch size (%s threads)" % (
                op, layout, res.context.get("omp_threads", "?")))
            fig.tight_layout()
            name = "bw_%s_%s.%s" % (op, layout, ext)
            save(fig, os.path.join(img_dir, name))
            plt.close(fig)
            written[(op, layout)] = name

    # Headline: geometric-mean time/copy per operation and layout.
    ops = res.ops()
    if ops:
        fig, ax = plt.subplots(figsize=(12, 3.8))
        groups = [(op, layout) for op in ops for layout in LAYOUTS]
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            vals = [summary_stats(res, op, [layout])[impl] or 0 for op, layout in groups]
            ax.bar([g + (k - (len(impls) - 1) / 2) * width for g in range(len(groups))], vals,
                   width, color=colors[impl], label=LABEL[impl])
        for g, (op, _) in enumerate(groups):
            t = TARGETS.get(base_op(op))
            if t:
                ax.hlines(t[0], g - 0.45, g + 0.45, colors="black", linewidth=1)
        ax.axhline(1.0, color="#7f7f7f", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["%s\n%s" % (op.replace("fwd_", "").replace("_relu", "+relu"),
                                         layout) for op, layout in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time / NT copy (geomean)")
        ax.set_title("Geometric mean of time / non-temporal copy of the same traffic "
                     "(lower is better; black: target, dashed: copy)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        save(fig, os.path.join(img_dir, "summary." + ext))
        plt.close(fig)
        written["summary"] = "summary." + ext
    return written


# ---------------------------------------------------------------- markdown

SIZE_CLASSES = [("< 2 MB (L2)", 0, 2), ("2-16 MB (L3)", 2, 16), ("16-64 MB", 16, 64),
                ("> 64 MB (memory)", 64, 1e12)]


def write_markdown(res, path, images, img_rel):
    ctx = res.context
    # run_bench.sh's files: FILE.passN (the full suite), FILE.closeN (close calls).
    passes = ctx.get("best_of_passes", "").split()
    close_passes = [p for p in passes if re.search(r"\.close\d+$", p)]
    full_passes = [p for p in passes if p not in close_passes]
    impls = res.impls()
    out = []
    w = out.append
    offset = ctx.get("buffer_offset", "0")
    copy_buffers = ("on the same buffers" if offset == "0" else
                    "on page-aligned buffers (the tensors are %s bytes past a page; the copy stays "
                    "the same reference)" % offset)
    chosen = ctx.get("suite") == "problems"  # bnorm_bench --problems=LIST
    w("# Performance" if offset == "0" else
      "# Performance with tensors %s bytes past a page boundary (as from malloc)" % offset)
    w("")
    w("<!-- Generated by bench/report.py from bnorm_bench JSON; do not edit by hand. -->")
    w("")
    w("Every row times one call of one operation on one problem, with both cores, and divides "
      "its time by the time of a **non-temporal memory copy that moves the same traffic**, "
      "measured in the same process %s. A ratio of 1.0 means the operation "
      "runs at the speed of the machine's memory; below 1.0 happens when the tensor fits in "
      "cache, where a copy with streaming stores is not the fastest way to move data."
      % copy_buffers)
    w("")
    w("What the figures mean, the shapes where bnorm misses a target and why: "
      "[performance-notes.md](performance-notes.md) (written by hand for the run below).")
    w("")
    w("## How it was measured")
    w("")
    caches = ", ".join("L%d%s %s%s" % (c["level"], {"Data": "d", "Instruction": "i"}.get(
        c["type"], ""), human_bytes(c["size"]),
        " per core" if c.get("num_sharing", 1) == 1 else " shared")
        for c in ctx.get("caches", []) if c.get("type") != "Instruction")
    machine = [
        ("CPU", "%s (lscpu: %s), %s CPUs, %s MHz" % (ctx.get("cpu_model", "?"),
                                                     ctx.get("lscpu_model", "?"),
                                                     ctx.get("num_cpus", "?"),
                                                     ctx.get("mhz_per_cpu", "?"))),
        ("Caches", caches or "none in sysfs (Google Benchmark reads them there); "
         "performance-notes.md says what the machine has"),
        ("Threads", "%s OpenMP threads for every implementation (libgomp, shared)"
         % ctx.get("omp_threads", "?")),
        ("bnorm", "instruction set `%s` (bnorm_isa()), commit `%s`" % (
            ctx.get("bnorm_isa", "?"), ctx.get("git", "?"))),
        ("oneDNN", ctx.get("onednn_version", "not built")),
        ("PyTorch", ctx.get("torch_version", "not built")),
        ("Packages", ctx.get("packages", "?").replace(";", "; ").strip()),
        ("Copy", "non-temporal stores (`%s`), split over all threads, best of 9 batches "
         "before each row" % ctx.get("copy_isa", "?")),
        ("Allocator", "LD_PRELOAD=%s, MALLOC_CONF=%s" % (ctx.get("ld_preload", "?"),
                                                         ctx.get("malloc_conf", "?"))),
        ("Buffers", "x, dy and y (every implementation's) "
         + ("page aligned" if ctx.get("buffer_offset", "0") == "0"
            else "%s bytes past a page boundary (--buffer_offset)" % ctx["buffer_offset"])),
        ("Run", "%s, suite %s, min time %s s per row; before the run: CPUs %s busy, "
         "load average %s" % (ctx.get("date", "?"), ctx.get("suite", "?"),
                              ctx.get("min_time_s", "?"), ctx.get("busy_before", "?"),
                              ctx.get("load_before", "?"))),
        ("Input", ", ".join(os.path.basename(p) for p in res.files)
         + ("" if "merged_from" not in ctx else " (reruns merged)")
         + ("" if "best_of_passes" not in ctx else
            "; best of %d full passes (%s)%s: each row's fastest pass, its ratio against the "
            "%s" % (len(full_passes), " ".join(full_passes),
                    "" if not close_passes else
                    " and, for the comparisons whose speed-up was below %.2f after them "
                    "(bnorm's rows and the peers'), %d more (%s)" % (CLOSE_MARGIN,
                                                                     len(close_passes),
                                                                     " ".join(close_passes)),
                    "copy of its own pass (median of the passes, --paired)" if res.use_paired
                    else "fastest of the copies of the same traffic timed just before the row "
                    "in each pass"))),
        ("Disturbed rows", "%d of %d (other processes used more than %d%% of the CPUs while "
         "they ran, or they failed; marked \u2020)" % (len(res.disturbed()), len(res.raw),
                                                        DISTURBED * 100)),
    ]
    w("| | |")
    w("|---|---|")
    for k, v in machine:
        w("| %s | %s |" % (k, v))
    w("")
    w("Reproduce (about 12 minutes a pass on a quiet machine; nothing else may run):")
    w("")
    w("```sh")
    w("cmake -S . -B build && cmake --build build -j2 --target bnorm_bench")
    passes = max(2, len(full_passes))
    w("bench/run_bench.sh --passes %d --out build/bench.json%s%s"
      % (passes, "" if offset == "0" else " --buffer_offset=" + offset,
         " --problems=" + ",".join(res.descs) if chosen else "   # --quick: 3 problems"))
    w("python3 bench/report.py build/bench.json       # this file and docs/img/")
    w("```")
    w("")
    w("Definitions:")
    w("")
    w("- **S** is the tensor's size in bytes (f32). **GB/s** is tensor traffic per second "
      "(10^9 bytes): forward reads S and writes S, backward reads x and dy and writes dx "
      "(3 S). The ReLU mask (S/32) and per-channel vectors are not counted.")
    w(("- **time/copy** (in parentheses after GB/s) is the row's %s time divided by the time "
      "of a copy that moves the same traffic: a copy of S bytes for forward operations, of "
      "1.5 S bytes for backward. The copy reads with normal loads and writes with streaming "
      "stores (the widest the CPU has: the Copy row above), both threads, COPY_BUFFERS; it is timed right "
      "before each row (best of 9 batches), because this machine's memory bandwidth drifts "
      "by a factor of two over an hour (other virtual machines share it; see *The machine "
      "today* below). Rows run iterations for at least the min time; GB/s and speed-ups use "
      "the same %s time.%s" % ((("mean iteration", "mean") if res.use_mean else
                                 ("best iteration", "best")) +
                                (" Here (report.py --paired) time/copy is instead the median "
                                 "over the passes of each pass's best iteration divided by the "
                                 "copy timed before it in that pass." if res.use_paired else "",)))
      .replace("COPY_BUFFERS", copy_buffers))
    w("- **speed-up** is the faster peer's time divided by bnorm's on the same shape and "
      "layout; **bold** when below 1 (bnorm slower).")
    w("- Problems: %s. bnorm runs 2-D input as NCHW and as NHWC with spatial 1; "
      "the peers run it once (oneDNN format `nc`, a 2-D PyTorch tensor) and that row is "
      "compared with both." % (
          "those given to `bnorm_bench --problems` (not the issue's suite: the targets below "
          "are its thresholds applied to these shapes)" if chosen else
          "the ResNet-50 batch-norm inputs (channels x height x width) at batch 1, 8, "
          "32, 128 and 2-D (N, C) input"))
    w("- **oneDNN**: `batch_normalization_forward`/`_backward` primitives created outside the "
      "timing loop, `use_scale | use_shift` (+ `use_global_stats` for inference, + "
      "`fuse_norm_relu` for the ReLU rows), format tags `nchw`/`nhwc`/`nc`.")
    w("- **PyTorch**: `at::batch_norm` (training and inference; training also updates the "
      "running statistics, and so do bnorm's rows with `bnorm_update_running_stats`) and "
      "`at::native_batch_norm_backward`, `channels_last` tensors for NHWC, in "
      "`c10::InferenceMode`. PyTorch allocates its outputs on every call: it runs under "
      "**jemalloc as a caching allocator** (see the allocator row above) so that page faults "
      "of fresh outputs are not timed. **Its ReLU is unfused**: `batch_norm` then `relu_`, "
      "and `threshold_backward` before the backward.")
    w("- Every row makes one untimed call first (JIT, first-touch of outputs). Small tensors "
      "stay in cache from one iteration to the next, as in a benchmark loop; so does the "
      "copy they are compared with.")
    w("")

    if res.machine:
        w("## The machine today")
        w("")
        w("Best GB/s of reads + writes with both threads (loops of the copy's instruction "
          "set, four accumulators for the read), measured in the same run. Beyond the L3 "
          "cache, every operation that "
          "writes with ordinary stores pays a read of each written line first; streaming "
          "stores do not, and this is the gap that the time/copy ratios measure.")
        w("")
        sizes = sorted({b for _, b in res.machine})
        w("| working set | read-only | copy | copy, non-temporal stores |")
        w("|---|---|---|---|")
        for b in sizes:
            w("| %s | %s | %s | %s |" % (human_bytes(b), *(fmt(res.machine.get((k, b)), 1)
                                                        for k in ("read", "copy", "nt_copy"))))
        w("")
    # Targets.
    w("## Against the targets")
    w("")
    w("Geometric means over all shapes. Targets (issue): forward training time/copy <= 1.4 "
      "and >= 2.0x over the faster peer; forward inference <= 1.15 and >= 1.2x; backward "
      "<= 2.0 and >= 1.6x; no single shape slower than the faster peer (the target applies to "
      "*both* layouts together; the ReLU rows are held to their base operation's targets).")
    w("")
    if "summary" in images:
        w("![geometric means](%s/%s)" % (img_rel, images["summary"]))
        w("")
    head = "| operation | layout | rows | " + " | ".join(
        "%s time/copy" % LABEL[i] for i in impls) + \
        " | speed-up (geomean) | min speed-up | shapes slower | target | |"
    w(head)
    w("|" + "---|" * (head.count("|") - 1))
    for op in res.ops():
        for layout in LAYOUTS + ["both"]:
            ls = LAYOUTS if layout == "both" else [layout]
            st = summary_stats(res, op, ls)
            target = TARGETS.get(base_op(op))
            tgt = "<= %s, >= %sx" % target if target else "-"
            v = verdict(op, st) if layout == "both" else ""
            name = "**%s**" % op if layout == "both" else op
            w("| %s | %s | %d | %s | %s | %s | %d | %s | %s |" % (
                name, layout, st["n"], " | ".join(fmt(st[i]) for i in impls),
                fmt(st["speedup"]), fmt(st["min_speedup"]), st["slower"],
                tgt if layout == "both" else "", v))
    w("")

    # Size classes.
    w("## bnorm's time/copy by tensor size")
    w("")
    w("Geometric mean of bnorm's time/copy (and of the speed-up over the faster peer) per "
      "class of tensor size S. Streaming stores go to memory whatever the size, so the "
      "copy's rate hardly depends on S, while a kernel whose data stays in cache between "
      "calls runs faster: ratios below 1 in the small classes.")
    w("")
    w("| operation | layout | " + " | ".join(c[0] for c in SIZE_CLASSES) + " |")
    w("|---|---|" + "---|" * len(SIZE_CLASSES))
    for op in res.ops():
        for layout in LAYOUTS:
            cells = []
            for _, lo, hi in SIZE_CLASSES:
                es = [(rows, s) for desc, _, rows, s in res.entries(op, [layout])
                      if lo <= tensor_mb(parse_shape(desc)) < hi]
                r = geomean([rows["bnorm"].ratio for rows, _ in es])
                s = geomean([s for _, s in es])
                cells.append("%s (%sx, %d)" % (fmt(r), fmt(s), len(es)) if es else "-")
            w("| %s | %s | %s |" % (op, layout, " | ".join(cells)))
    w("")
    w("Cells: time/copy (speed-up over the faster peer, number of rows).")
    w("")

    # Worst shapes.
    w("## Where bnorm is furthest from the limit and from the peers")
    w("")
    for op in res.ops():
        es = res.entries(op)
        if not es:
            continue
        worst_ratio = sorted(es, key=lambda e: -e[2]["bnorm"].ratio)[:5]
        worst_speed = sorted([e for e in es if e[3] is not None], key=lambda e: e[3])[:5]
        w("**%s**" % op)
        w("")
        w("- highest time/copy: " + "; ".join(
            "`%s` %s (%s MB) %s" % (d, l, fmt(tensor_mb(parse_shape(d)), 1),
                                    fmt(r["bnorm"].ratio)) for d, l, r, _ in worst_ratio))
        if worst_speed:
            w("- lowest speed-up: " + "; ".join(
                "`%s` %s %sx (time/copy: bnorm %s, %s)" % (
                    d, l, fmt(s), fmt(r["bnorm"].ratio), ", ".join(
                        "%s %s" % (LABEL[p], fmt(r[p].ratio)) for p in PEERS if p in r))
                for d, l, r, s in worst_speed))
        w("")

    # Plots.
    plots = [(op, layout) for op in res.ops() for layout in LAYOUTS if (op, layout) in images]
    if plots:
        w("## Bandwidth against batch size")
        w("")
        w("Tensor traffic in GB/s for each ResNet-50 layer against the batch size, and for 2-D "
          "input against N; the dashed line is the NT copy of the same traffic.")
        w("")
        for op, layout in plots:
            w("### %s, %s" % (op, layout))
            w("")
            w("![%s %s](%s/%s)" % (op, layout, img_rel, images[(op, layout)]))
            w("")

    # Full tables.
    w("## All rows")
    w("")
    w("GB/s of tensor traffic, (time / NT copy) in parentheses; copy GB/s is the copy's "
      "rate for the same traffic.")
    w("")
    for op in res.ops():
        w("### %s" % op)
        w("")
        w("| shape | MB | layout | copy GB/s | " + " | ".join(LABEL[i] for i in impls) +
          " | speed-up |")
        w("|---|---|---|---|" + "---|" * len(impls) + "---|")
        for desc, layout, rows, s in res.entries(op):
            w("| %s | %s | %s | %s | %s | %s |" % (
                desc, fmt(tensor_mb(parse_shape(desc)), 1), layout,
                fmt(rows["bnorm"].copy_gbs, 1),
                " | ".join(cell(rows.get(i)) for i in impls), speedup_cell(s)))
        w("")
    errors = sorted("%s/%s/%s/%s: %s" % (k + (r.error,)) for k, r in res.rows.items() if r.error)
    if errors:
        w("## Rows that failed")
        w("")
        for e in errors:
            w("- %s" % e)
        w("")
    if res.copies:
        w("## The copy itself")
        w("")
        w("| bytes copied | GB/s (mean of the row, traffic = 2 x bytes) | GB/s (best of 9 "
          "batches) |")
        w("|---|---|---|")
        for b in sorted(res.copies):
            r = res.copies[b]
            w("| %s | %s | %s |" % (human_bytes(b), fmt(r.gbs, 1), fmt(r.copy_gbs, 1)))
        w("")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out))


def read_files(paths):
    """The first file's JSON (context and all) and every file's benchmarks, in order."""
    first, benchmarks = None, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if first is None:
            first = data
        benchmarks.extend(data.get("benchmarks", []))
    return first, benchmarks


def merge_json(paths, out):
    """Benchmarks of all files, a later row replacing an earlier one of the same name."""
    merged, benchmarks = read_files(paths)
    rows = collections.OrderedDict()
    for b in benchmarks:
        key = (b.get("run_name", b["name"]), b.get("run_type"), b.get("aggregate_name"),
               b.get("repetition_index"))
        rows[key] = b
    merged["benchmarks"] = list(rows.values())
    merged.setdefault("context", {})["merged_from"] = " ".join(
        os.path.basename(p) for p in paths)
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)


def best_of_json(paths, out):
    """Rows of several full passes of the suite (bench/run_bench.sh --passes): each
    row's fastest pass, timed against the fastest of the copies of the same
    traffic timed just before that row in each pass. This machine runs at full or
    at about half speed for seconds to minutes at a time (other virtual machines
    share it); a row and the rows of its peers,
    measured seconds apart, may fall into different states. The best of passes
    minutes apart gives every implementation, and the copy, its full-speed figure.

    Each row also gets paired_ratio: the median over the passes of the pass's
    best iteration divided by the copy timed just before it in the same pass
    (report.py --paired). Pairing a row with its own copy cancels the state
    both ran in, unless it changed between them; the median of the passes
    drops such flips. The best-of ratio above is the conservative one: a copy
    that once caught a fast state sets the reference for every pass."""
    merged, benchmarks = read_files(paths)
    if any(b.get("run_type") == "aggregate" for b in benchmarks):
        sys.exit("report.py --best-of: passes of the suite without --benchmark_repetitions")
    rows = collections.OrderedDict()
    for b in benchmarks:
        rows.setdefault(b.get("run_name", b["name"]), []).append(b)
    best = []
    for bs in rows.values():
        ok = [b for b in bs if not b.get("error_occurred")]
        # A pass that ran next to other processes only if every pass did.
        ok = [b for b in ok if (b.get("others_cpu") or 0) <= DISTURBED] or ok
        if not ok:
            best.append(bs[-1])
            continue
        if all("best_ratio" in b and b.get("copy_GB/s") for b in ok):
            # A pass's best time is best_ratio * traffic / copy_GB/s.
            fastest = dict(min(ok, key=lambda b: b["best_ratio"] / b["copy_GB/s"]))
            fastest["paired_ratio"] = statistics.median(b["best_ratio"] for b in ok)
            copy = max(b["copy_GB/s"] for b in ok)
            for key in ("best_ratio", "copy_ratio"):
                if key in fastest:
                    fastest[key] *= copy / fastest["copy_GB/s"]
            fastest["copy_GB/s"] = copy
        elif all("best_GB/s" in b for b in ok):  # machine rows
            fastest = dict(max(ok, key=lambda b: b["best_GB/s"]))
        else:  # copy rows
            fastest = dict(min(ok, key=lambda b: b.get("real_time", float("inf"))))
        fastest["passes"] = len(ok)
        best.append(fastest)
    merged["benchmarks"] = best
    merged.setdefault("context", {})["best_of_passes"] = " ".join(
        os.path.basename(p) for p in paths)
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)


def human_bytes(b):
    b = float(b)
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if b < 1024 or unit == "GiB":
            return ("%.0f %s" if b == int(b) else "%.1f %s") % (b, unit)
        b /= 1024


def reexec_with_matplotlib():
    """A python3 first on PATH (pyenv, venv) may lack the Debian matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        system = "/usr/bin/python3"
        if os.path.realpath(sys.executable) != os.path.realpath(system) and \
                os.path.exists(system) and os.environ.get("BNORM_REPORT_REEXEC") != "1":
            os.environ["BNORM_REPORT_REEXEC"] = "1"
            os.execv(system, [system] + sys.argv)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    docs = os.path.join(os.path.dirname(here), "docs")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="*",
                    help="bnorm_bench --benchmark_out files (default: the full run's file "
                    "of bench/run_bench.sh in build/ or build-bench/)")
    ap.add_argument("--summary", action="store_true", help="print a table, write nothing")
    ap.add_argument("--disturbed-filter", action="store_true",
                    help="print a --benchmark_filter for the rows that failed or ran next "
                    "to other processes (empty if none), write nothing")
    ap.add_argument("--close-filter", action="store_true",
                    help="print a --benchmark_filter for the rows of the comparisons whose "
                    "speed-up is below --margin (bnorm's and its peers'; empty if none), "
                    "write nothing")
    ap.add_argument("--margin", type=float, default=CLOSE_MARGIN,
                    help="of --close-filter (default %.2f)" % CLOSE_MARGIN)
    ap.add_argument("--merge-into", metavar="OUT",
                    help="write the merged rows of all inputs as one JSON file, nothing else")
    ap.add_argument("--best-of", metavar="OUT",
                    help="write each row's fastest pass of the inputs (full passes of the "
                    "suite) as one JSON file, nothing else")
    score = ap.add_mutually_exclusive_group()
    score.add_argument("--mean", action="store_true",
                       help="score rows by their mean iteration time instead of the best")
    score.add_argument("--paired", action="store_true",
                       help="time/copy as the median over the passes of each pass's ratio "
                       "to its own copy (a --best-of file); times and speed-ups unchanged")
    ap.add_argument("--md", default=os.path.join(docs, "performance.md"))
    ap.add_argument("--img-dir", default=os.path.join(docs, "img"))
    ap.add_argument("--format", choices=["svg", "png"], default="svg", help="of the plots")
    args = ap.parse_args()
    if not args.json and (args.merge_into or args.best_of):
        ap.error("--merge-into and --best-of need their input files")
    if not args.json:
        root = os.path.dirname(here)
        found = [p for p in (os.path.join(root, d, "bench", "bnorm_bench.json")
                             for d in ("build", "build-bench")) if os.path.exists(p)]
        if not found:
            ap.error("no JSON given and none in build/bench/ or build-bench/bench/; "
                     "run bench/run_bench.sh first")
        args.json = found[:1]
    writes_docs = not (args.summary or args.disturbed_filter or args.close_filter or
                       args.merge_into or args.best_of)
    if writes_docs:
        reexec_with_matplotlib()
    res = Results(args.json, use_mean=args.mean, use_paired=args.paired)
    if args.disturbed_filter or args.close_filter:
        names = res.close_calls(args.margin) if args.close_filter else res.disturbed()
        if names:
            print("^(%s)(/manual_time)?$" % "|".join(re.escape(n) for n in names))
        return
    if args.merge_into:
        merge_json(args.json, args.merge_into)
        return
    if args.best_of:
        best_of_json(args.json, args.best_of)
        return
    if args.summary:
        print_summary(res)
        return
    images = make_plots(res, args.img_dir, args.format) or {}
    img_rel = os.path.relpath(args.img_dir, os.path.dirname(os.path.abspath(args.md)))
    write_markdown(res, args.md, images, img_rel)
    print("wrote %s and %d plots in %s" % (args.md, len(images), args.img_dir), file=sys.stderr)


if __name__ == "__main__":
    main()
