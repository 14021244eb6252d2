//! CPU topology read from Linux sysfs: no library, nothing to install.
//!
//! Under a sysfs root (`/sys` on a real machine, a fixture directory in tests):
//! `devices/system/cpu/online` lists the online CPUs; each CPU's
//! `devices/system/cpu/cpuN/topology/thread_siblings_list` names the hardware threads of its
//! core (its SMT siblings), with `physical_package_id` and `core_id` beside it; and
//! `devices/system/node/nodeN/cpulist` lists each NUMA node's CPUs (absent on kernels without
//! NUMA, where the machine is one node). Only the CPUs the process may run on are read.
//!
//! sysfs is the kernel's word, but a file can be missing (a sandbox that hides parts of /sys)
//! or unreadable: every such case is a [`SysfsError`] naming the file, and the caller runs
//! unpinned rather than guessing.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::Layout;

/// The largest CPU index accepted from a file: a list such as `0-4294967295` is refused
/// instead of expanded (the kernel's `NR_CPUS` ceiling is 8192 today).
const MAX_CPU: usize = 1 << 16;

/// sysfs files are a page at most; reading more than this means the file is not what we think.
const MAX_FILE: u64 = 1 << 20;

/// A sysfs file that could not be read or parsed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SysfsError {
    pub(super) path: PathBuf,
    pub(super) reason: String,
}

impl fmt::Display for SysfsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl SysfsError {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The cores of the CPUs in `allowed` (OS indices, e.g. the process's affinity mask), one
/// representative CPU each (the lowest allowed thread of the core), grouped by NUMA node.
pub(super) fn read(root: &Path, allowed: &[usize]) -> Result<Layout, SysfsError> {
    let cpu_dir = root.join("devices/system/cpu");
    let online_path = cpu_dir.join("online");
    let online = match read_small(&online_path) {
        Ok(Some(s)) => Some(parse_cpulist(&s).map_err(|r| SysfsError::new(&online_path, r))?),
        Ok(None) => None,
        Err(e) => return Err(e),
    };

    // Cores keyed by their thread siblings: every hardware thread of a core lists the same set.
    let mut cores: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    let mut pus = 0;
    for &cpu in allowed {
        if online
            .as_ref()
            .is_some_and(|on| on.binary_search(&cpu).is_err())
        {
            continue;
        }
        let dir = cpu_dir.join(format!("cpu{cpu}"));
        // Without an `online` list, a CPU's own `online` file says whether it is up (cpu0 has
        // none on most machines: it cannot be taken offline).
        if online.is_none() {
            let p = dir.join("online");
            if let Some(s) = read_small(&p)?
                && s.trim() == "0"
            {
                continue;
            }
        }
        let topo = dir.join("topology");
        let siblings_path = topo.join("thread_siblings_list");
        let siblings = match read_small(&siblings_path)? {
            Some(s) => parse_cpulist(&s).map_err(|r| SysfsError::new(&siblings_path, r))?,
            None => return Err(SysfsError::new(&siblings_path, "missing")),
        };
        if siblings.binary_search(&cpu).is_err() {
            return Err(SysfsError::new(
                &siblings_path,
                format!("does not list cpu{cpu} itself"),
            ));
        }
        // Not needed to group threads (the siblings list does that), but a file that exists
        // and says something else than a number means this sysfs is not what we read it as.
        for name in ["core_id", "physical_package_id"] {
            let p = topo.join(name);
            if let Some(s) = read_small(&p)? {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| SysfsError::new(&p, format!("{:?} is not a number", s.trim())))?;
            }
        }
        cores.entry(siblings).or_default().push(cpu);
        pus += 1;
    }
    if cores.is_empty() {
        return Err(SysfsError::new(
            &cpu_dir,
            format!("none of the {} allowed CPUs is online", allowed.len()),
        ));
    }
    let mut reps: Vec<usize> = cores
        .values()
        .filter_map(|threads| threads.iter().min().copied())
        .collect();
    reps.sort_unstable();

    let nodes = read_nodes(&root.join("devices/system/node"))?;
    let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len().max(1)];
    for cpu in reps {
        // A CPU no node lists (a kernel that reports memory-only nodes oddly) goes with the
        // first node rather than being dropped.
        let node = nodes
            .iter()
            .position(|list| list.binary_search(&cpu).is_ok())
            .unwrap_or(0);
        per_node[node].push(cpu);
    }
    Ok(Layout { per_node, pus })
}

/// The NUMA node the kernel reports for PCI device `address` (`0000:65:00.0`, the bus id
/// nvidia-smi and CUDA print; a GPU's memory traffic is cheapest from its node's cores).
/// `None` when the device is absent, the kernel does not know (`-1`), or the address is not
/// one (it never becomes a path outside the PCI devices folder).
pub(super) fn pci_numa_node(root: &Path, address: &str) -> Option<usize> {
    let parts: Vec<&str> = address.split([':', '.']).collect();
    let well_formed = parts.len() == 4
        && parts
            .iter()
            .zip([4, 2, 2, 1])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return None;
    }
    let p = root.join(format!(
        "bus/pci/devices/{}/numa_node",
        address.to_ascii_lowercase()
    ));
    read_small(&p).ok()??.trim().parse::<usize>().ok()
}

/// Each NUMA node's CPU list, in node order; empty when the kernel has no NUMA directory.
fn read_nodes(node_dir: &Path) -> Result<Vec<Vec<usize>>, SysfsError> {
    let entries = match std::fs::read_dir(node_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SysfsError::new(node_dir, e.to_string())),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SysfsError::new(node_dir, e.to_string()))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            // `possible`, `online`, `has_cpu`… are lists about nodes, not nodes.
            continue;
        };
        ids.push(id);
    }
    ids.sort_unstable();
    let mut nodes = Vec::with_capacity(ids.len());
    for id in ids {
        let p = node_dir.join(format!("node{id}/cpulist"));
        let list = match read_small(&p)? {
            Some(s) => parse_cpulist(&s).map_err(|r| SysfsError::new(&p, r))?,
            None => return Err(SysfsError::new(&p, "missing")),
        };
        nodes.push(list);
    }
    Ok(nodes)
}

/// A small file's text; `None` when it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, SysfsError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SysfsError::new(path, e.to_string())),
    };
    let mut s = String::new();
    f.take(MAX_FILE + 1)
        .read_to_string(&mut s)
        .map_err(|e| SysfsError::new(path, e.to_string()))?;
    if s.len() as u64 > MAX_FILE {
        return Err(SysfsError::new(
            path,
            format!("longer than {MAX_FILE} bytes"),
        ));
    }
    Ok(Some(s))
}

/// The kernel's CPU list format (`0-3,8,10-11`; empty for none), sorted and deduplicated.
fn parse_cpulist(s: &str) -> Result<Vec<usize>, String> {
    let s = s.trim();
    let mut cpus = Vec::new();
    if s.is_empty() {
        return Ok(cpus);
    }
    let num = |t: &str| -> Result<usize, String> {
        let n = t
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("{t:?} in CPU list {s:?} is not a CPU number"))?;
        if n >= MAX_CPU {
            return Err(format!(
                "CPU {n} in CPU list {s:?} is past the largest accepted ({})",
                MAX_CPU - 1
            ));
        }
        Ok(n)
    };
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part:?} in CPU list {s:?} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
        // Overlapping ranges could repeat CPUs without bound; MAX_CPU distinct ones is the most
        // a valid list holds.
        if cpus.len() > MAX_CPU {
            return Err(format!("CPU list {s:?} lists more than {MAX_CPU} CPUs"));
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: `cpus` as (cpu, thread siblings list, package, core), `nodes` as each
    /// node's cpulist, `online` as the online list (or none).
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(cpus: &[(usize, &str, i64, i64)], nodes: &[&str], online: Option<&str>) -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let f = Fixture { dir };
            for &(cpu, siblings, package, core) in cpus {
                let t = format!("devices/system/cpu/cpu{cpu}/topology");
                f.write(
                    &format!("{t}/thread_siblings_list"),
                    &format!("{siblings}\n"),
                );
                f.write(&format!("{t}/physical_package_id"), &format!("{package}\n"));
                f.write(&format!("{t}/core_id"), &format!("{core}\n"));
            }
            for (i, list) in nodes.iter().enumerate() {
                f.write(
                    &format!("devices/system/node/node{i}/cpulist"),
                    &format!("{list}\n"),
                );
            }
            if !nodes.is_empty() {
                f.write("devices/system/node/possible", "0-7\n");
            }
            if let Some(list) = online {
                f.write("devices/system/cpu/online", &format!("{list}\n"));
            }
            f
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.dir.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("has a parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }

        fn read(&self, allowed: &[usize]) -> Result<Layout, SysfsError> {
            read(self.dir.path(), allowed)
        }
    }

    /// 4 cores × 2 threads, Intel numbering (siblings n and n+4), one node.
    fn smt_machine() -> Fixture {
        let cpus: Vec<(usize, String, i64, i64)> = (0..8)
            .map(|c| (c, format!("{},{}", c % 4, c % 4 + 4), 0, (c % 4) as i64))
            .collect();
        let cpus: Vec<(usize, &str, i64, i64)> = cpus
            .iter()
            .map(|(c, s, p, k)| (*c, s.as_str(), *p, *k))
            .collect();
        Fixture::new(&cpus, &["0-7"], Some("0-7"))
    }

    #[test]
    fn cpulists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist("\n"), Ok(vec![]));
        assert_eq!(parse_cpulist("5,1-2,2"), Ok(vec![1, 2, 5]));
        for bad in ["a", "1-", "3-1", "0-4294967295", "1,,2", "-1", "0x3"] {
            assert!(parse_cpulist(bad).is_err(), "{bad:?} parsed");
        }
        let repeated = ["0-65535"; 3].join(",");
        assert!(parse_cpulist(&repeated).is_err());
    }

    #[test]
    fn smt_siblings_make_one_core_each() {
        let f = smt_machine();
        let l = f.read(&(0..8).collect::<Vec<_>>()).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 1, 2, 3]]);
        assert_eq!(l.pus, 8);
        // Only the second thread of core 1 allowed: that thread represents the core.
        let l = f.read(&[5, 2]).expect("reads");
        assert_eq!(l.per_node, vec![vec![2, 5]]);
        assert_eq!(l.pus, 2);
    }

    #[test]
    fn two_numa_nodes_group_their_cores() {
        // AMD-style numbering: siblings adjacent (0,1), (2,3)…; node 0 has cpus 0-3, node 1 4-7.
        let cpus: Vec<(usize, String)> = (0..8)
            .map(|c| (c, format!("{}-{}", c & !1, (c & !1) + 1)))
            .collect();
        let cpus: Vec<(usize, &str, i64, i64)> = cpus
            .iter()
            .map(|(c, s)| (*c, s.as_str(), (*c / 4) as i64, (*c / 2) as i64))
            .collect();
        let f = Fixture::new(&cpus, &["0-3", "4-7"], Some("0-7"));
        let l = f.read(&(0..8).collect::<Vec<_>>()).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 2], vec![4, 6]]);
        assert_eq!(l.pus, 8);
    }

    #[test]
    fn offline_cpus_are_skipped() {
        let f = smt_machine();
        // cpu 3 and its sibling 7 offline: their core is gone.
        f.write("devices/system/cpu/online", "0-2,4-6\n");
        let l = f.read(&(0..8).collect::<Vec<_>>()).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 1, 2]]);
        assert_eq!(l.pus, 6);

        // Without the online list, each CPU's own `online` file is read.
        let f = smt_machine();
        std::fs::remove_file(f.dir.path().join("devices/system/cpu/online")).expect("rm");
        f.write("devices/system/cpu/cpu1/online", "0\n");
        f.write("devices/system/cpu/cpu5/online", "0\n");
        f.write("devices/system/cpu/cpu2/online", "1\n");
        let l = f.read(&(0..8).collect::<Vec<_>>()).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 2, 3]]);
        assert_eq!(l.pus, 6);
    }

    #[test]
    fn a_restricted_affinity_mask_is_respected() {
        let f = smt_machine();
        // taskset -c 0,4,6: core 0 (both threads) and core 2 (one thread).
        let l = f.read(&[0, 4, 6]).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 6]]);
        assert_eq!(l.pus, 3);
    }

    #[test]
    fn a_machine_without_numa_directories_is_one_node() {
        let f = Fixture::new(&[(0, "0", 0, 0), (1, "1", 0, 1)], &[], None);
        let l = f.read(&[0, 1]).expect("reads");
        assert_eq!(l.per_node, vec![vec![0, 1]]);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let all: Vec<usize> = (0..8).collect();
        let cases: [(&str, &str, &str); 6] = [
            (
                "devices/system/cpu/cpu3/topology/thread_siblings_list",
                "three\n",
                "thread_siblings_list",
            ),
            (
                "devices/system/cpu/cpu3/topology/thread_siblings_list",
                "0\n",
                "does not list cpu3",
            ),
            ("devices/system/cpu/cpu2/topology/core_id", "x\n", "core_id"),
            ("devices/system/node/node0/cpulist", "0-\n", "cpulist"),
            ("devices/system/cpu/online", "7-0\n", "runs backwards"),
            (
                "devices/system/cpu/online",
                "0-99999999\n",
                "past the largest",
            ),
        ];
        for (file, text, says) in cases {
            let f = smt_machine();
            f.write(file, text);
            let e = f.read(&all).expect_err(file);
            let msg = e.to_string();
            assert!(msg.contains(says), "{file}: {msg}");
            assert!(
                e.path.ends_with(file.rsplit('/').next().unwrap_or(file)),
                "{msg}"
            );
        }

        // A missing topology file is named, not guessed around.
        let f = smt_machine();
        std::fs::remove_file(
            f.dir
                .path()
                .join("devices/system/cpu/cpu1/topology/thread_siblings_list"),
        )
        .expect("rm");
        let e = f.read(&all).expect_err("missing siblings");
        assert!(
            e.to_string()
                .contains("cpu1/topology/thread_siblings_list: missing"),
            "{e}"
        );

        // No sysfs at all (a container without /sys): an error, not an empty machine.
        let empty = tempfile::tempdir().expect("temp dir");
        let e = read(empty.path(), &all).expect_err("empty sysfs");
        assert!(e.to_string().contains("missing"), "{e}");

        // An affinity mask of only offline CPUs.
        let f = smt_machine();
        f.write("devices/system/cpu/online", "0-3\n");
        let e = f.read(&[4, 5]).expect_err("all offline");
        assert!(
            e.to_string()
                .contains("none of the 2 allowed CPUs is online"),
            "{e}"
        );
    }

    #[test]
    fn a_pci_devices_numa_node_is_read_when_the_kernel_knows_it() {
        let f = smt_machine();
        f.write("bus/pci/devices/0000:65:00.0/numa_node", "1\n");
        f.write("bus/pci/devices/0000:17:00.0/numa_node", "-1\n");
        f.write("bus/pci/devices/0000:18:00.0/numa_node", "one\n");
        f.write("bus/pci/devices/0000:6a:00.0/numa_node", "0\n");
        let root = f.dir.path();
        assert_eq!(pci_numa_node(root, "0000:65:00.0"), Some(1));
        // Bus ids are printed in either case; sysfs names them in lower case.
        assert_eq!(pci_numa_node(root, "0000:6A:00.0"), Some(0));
        assert_eq!(pci_numa_node(root, "0000:17:00.0"), None);
        assert_eq!(pci_numa_node(root, "0000:18:00.0"), None);
        assert_eq!(pci_numa_node(root, "0000:99:00.0"), None);
        for bad in [
            "../../etc",
            "0000:65:00",
            "0000:65:00.0/..",
            "",
            "00000:65:00.0",
        ] {
            assert_eq!(pci_numa_node(root, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_machine_reads_if_it_has_sysfs() {
        let Ok(allowed) = super::super::affinity::current_thread() else {
            return;
        };
        if !Path::new("/sys/devices/system/cpu").exists() {
            return;
        }
        let l = read(Path::new("/sys"), &allowed).expect("this machine's sysfs reads");
        let cores: usize = l.per_node.iter().map(Vec::len).sum();
        assert!(cores >= 1 && cores <= l.pus && l.pus <= allowed.len());
    }
}
