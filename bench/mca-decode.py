#!/usr/bin/env python3
"""Models the decode kernels' inner loops on CPUs this machine is not, with llvm-mca.

For each Q4_K decode kernel in a strata binary (its one-token instance), this finds the
innermost loop that does the dot products, hands its instructions to llvm-mca for each CPU
model, and prints the modelled cycles per iteration and weight bytes per cycle. Only the loop
over the quants is modelled (the per-block scales and mins add roughly a tenth more); the
result is a ceiling from the instruction mix, not a measured speed: decode at B GB/s needs
B / GHz bytes per cycle.

Usage: bench/mca-decode.py [BINARY] [--cpus znver4,znver3,...]
Needs llvm-objdump and llvm-mca 17 or newer (Debian: apt-get install llvm-19).
"""
import re
import shutil
import subprocess
import sys

KERNELS = [
    ("512-bit VNNI (interleaved512)", "interleaved3q4k"),
    ("256-bit VNNI, EVEX (interleaved256 at avx512vnni)", "interleaved_vnni2564evex3q4k"),
    ("256-bit VNNI, VEX (avxvnni)", "interleaved_vnni2563vex3q4k"),
    ("AVX2 maddubs (avx2)", "interleaved_avx23q4k"),
]
DOT = ("vpdpbusd", "vpmaddubsw")


def dot(t):
    return t.removeprefix("{vex}").strip().startswith(DOT)


def tool(name):
    for v in ("-21", "-20", "-19", "-18", "-17", ""):
        if shutil.which(name + v):
            return name + v
    sys.exit(f"{name} not found: apt-get install llvm-19")


def smallest_symbol(binary, part):
    out = subprocess.run(["nm", "-S", binary], capture_output=True, text=True, check=True).stdout
    best = None
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4 and re.search(rf"\d{part}17h[0-9a-f]{{16}}E$", f[3]):
            addr, size = int(f[0], 16), int(f[1], 16)
            if best is None or size < best[1]:
                best = (addr, size)
    return best


def disassemble(objdump, binary, addr, size):
    out = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-M", "intel",
         f"--start-address={addr:#x}", f"--stop-address={addr + size:#x}", binary],
        capture_output=True, text=True, check=True).stdout
    insns = []
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+(\S.*)$", line)
        if m:
            text = re.sub(r"\s*(#|<).*$", "", m.group(2)).strip()
            insns.append((int(m.group(1), 16), text))
    return insns


def loops(insns):
    """(start index, end index) of every backward jump's loop."""
    index = {a: i for i, (a, _) in enumerate(insns)}
    found = []
    for i, (a, t) in enumerate(insns):
        m = re.match(r"j\w+\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            found.append((index[int(m.group(1), 16)], i))
    return found


def innermost_dot_loop(insns):
    ls = loops(insns)
    inner = [l for l in ls if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in ls)]
    inner = [l for l in inner if any(dot(insns[i][1]) for i in range(l[0], l[1]))]
    return max(inner, key=lambda l: l[1] - l[0]) if inner else None


def weight_bytes(body):
    """Bytes of the distinct full-width vector loads not from the stack."""
    seen = set()
    width = {"ymmword": 32, "zmmword": 64}
    for t in body:
        for w, addr in re.findall(r"(ymmword|zmmword) ptr \[([^\]]+)\]", t):
            if "rsp" not in addr:
                seen.add((w, addr.replace(" ", "")))
    # A pointer bumped inside the loop names some loads twice (before and after): count
    # offsets modulo the bump.
    bump = 0
    for t in body:
        m = re.match(r"add\s+(r\w+),\s*0x([0-9a-f]+)$", t)
        if m and any(m.group(1) + "+" in a or m.group(1) + "-" in a for _, a in seen):
            bump = int(m.group(2), 16)
    offs = set()
    for w, a in seen:
        m = re.match(r"(\w+)([+-]0x[0-9a-f]+)?$", a)
        base, off = (m.group(1), int(m.group(2) or "0", 16)) if m else (a, 0)
        offs.add((w, base, off % bump if bump else off))
    return sum(width[w] for w, _, _ in offs)


def fix_zero_idioms(body):
    """llvm-mca does not take EVEX `vpxord xmmN, xmmN, xmmN` (N >= 16) as a zero idiom, so it
    chains every iteration's accumulator to the last; the CPUs do. Rename N to a free
    register below 16, where the VEX idiom is recognised."""
    text = "\n".join(body)
    used = {int(n) for n in re.findall(r"[xyz]mm(\d+)", text)}
    for n in sorted({int(n) for n in re.findall(r"vpxord\s+xmm(\d+), xmm\1, xmm\1", text)}):
        free = next((f for f in range(16) if f not in used), None)
        if n < 16 or free is None:
            continue
        used.add(free)
        text = re.sub(rf"\b([xyz])mm{n}\b", rf"\g<1>mm{free}", text)
        text = re.sub(rf"vpxord\s+xmm{free}, xmm{free}, xmm{free}",
                      f"vpxor xmm{free}, xmm{free}, xmm{free}", text)
    return text.splitlines()


def main():
    args = sys.argv[1:]
    # LLVM 19's Intel models chain every vpdpbusd of a loop to the last iteration's (about
    # 4 bytes/cycle for the 512-bit loop, where this Xeon runs it at about 10 from L2), so
    # by default only AMD's are asked; --cpus names others.
    cpus = ["znver4", "znver3"]
    if "--cpus" in args:
        i = args.index("--cpus")
        cpus = args[i + 1].split(",")
        del args[i:i + 2]
    binary = args[0] if args else "target/release/strata"
    objdump, mca = tool("llvm-objdump"), tool("llvm-mca")
    print(f"{binary}: Q4_K decode inner loops, one token, modelled by {mca}")
    print("kernel | cpu | cycles/iter | weight bytes/iter | bytes/cycle")
    for name, part in KERNELS:
        sym = smallest_symbol(binary, part)
        if not sym:
            print(f"{name}: not in the binary")
            continue
        insns = disassemble(objdump, binary, *sym)
        loop = innermost_dot_loop(insns)
        if not loop:
            print(f"{name}: no inner loop found")
            continue
        body = [t for _, t in insns[loop[0]:loop[1]]]
        body = fix_zero_idioms(body)
        nbytes = weight_bytes(body)
        src = ".intel_syntax noprefix\n" + "\n".join(body) + "\n"
        for cpu in cpus:
            if cpu in ("znver1", "znver2", "znver3") and "VNNI" in name:
                print(f"{name} | {cpu} | no VNNI on this CPU")
                continue
            r = subprocess.run([mca, "-mtriple=x86_64", f"-mcpu={cpu}", "-iterations=400"],
                               input=src, capture_output=True, text=True)
            m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
            if not m:
                err = (r.stderr.strip().splitlines() or ["?"])[0]
                if "unsupported instruction" in err:
                    err = "has no such instructions"
                print(f"{name} | {cpu} | {err}")
                continue
            cyc = int(m.group(1)) / 400
            print(f"{name} | {cpu} | {cyc:.1f} | {nbytes} | {nbytes / cyc:.1f}")


if __name__ == "__main__":
    main()
