//! The CPU topology the pool is placed on: physical cores and NUMA nodes, discovered once.
//!
//! [`get`] reads the cores this process may run on (its affinity mask, as `taskset` or a
//! container's cpuset left it) from Linux sysfs ([`sysfs`]), keeps one hardware thread (PU)
//! per core, and orders the cores so that consecutive slots alternate between NUMA nodes: a
//! pool of `n` threads pinned to slots `0..n` spreads its memory traffic over every node's
//! controller instead of saturating one. Threads are pinned with `sched_setaffinity`. With
//! the `hwloc` cargo feature, hwloc (through `hwlocality`, which needs the hwloc C library and
//! its pkg-config file) discovers the machine instead, and sysfs is the fallback. Where
//! neither can tell (a sandbox hiding /sys), [`Topology::cores`] is empty, the reason is kept
//! for [`Topology::summary`], and callers run unpinned.

mod affinity;
#[cfg(feature = "hwloc")]
mod hwloc;
mod sysfs;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

/// Why a thread could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The machine's topology could not be discovered (or the affinity mask read).
    #[error("CPU topology unavailable: {0}")]
    Unavailable(String),
    /// The slot asked for is past the number of physical cores.
    #[error("no physical core for slot {slot} ({cores} cores)")]
    NoSuchCore { slot: usize, cores: usize },
    /// The operating system refused the binding.
    #[error("binding to CPU {cpu} failed: {reason}")]
    Bind { cpu: usize, reason: String },
}

/// One physical core as the pool uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// OS index of the hardware thread a pinned thread runs on (the lowest allowed PU of the
    /// core, so its SMT sibling stays free for the OS rather than competing for the same ALUs).
    pub cpu: usize,
    /// Index of the core's NUMA node among the nodes that have usable cores (0 where the
    /// machine reports no NUMA nodes).
    pub numa_node: usize,
}

/// What a discovery found: each usable core's representative CPU, grouped by NUMA node in
/// node order (nodes may be empty), and the hardware threads the process may use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    per_node: Vec<Vec<usize>>,
    pus: usize,
}

/// The machine as discovered once per process.
pub struct Topology {
    /// Cores in pinning order (NUMA nodes interleaved); empty when pinning is impossible.
    cores: Vec<Core>,
    numa_nodes: usize,
    /// Hardware threads this process may use (for the summary; SMT shows up as pus > cores).
    pus: usize,
    /// What the topology was read from (`sysfs`, `hwloc`).
    source: &'static str,
    /// Why `cores` is empty, if it is.
    unavailable: Option<String>,
}

/// The process's topology, discovered on first call. Never panics: a failed discovery yields
/// a topology with no cores, on which every pin fails with [`TopologyError::Unavailable`].
pub fn get() -> &'static Topology {
    static TOPOLOGY: OnceLock<Topology> = OnceLock::new();
    TOPOLOGY.get_or_init(|| {
        let t = Topology::discover();
        tracing::debug!(summary = %t.summary(), "CPU topology");
        t
    })
}

/// Physical cores this process may run on: the sensible default thread count for compute
/// bound work (SMT siblings share the ALUs a quantized dot product saturates). Falls back to
/// the OS's count of available hardware threads when the topology cannot be read.
pub fn physical_cores() -> usize {
    let t = get();
    if t.cores.is_empty() {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        t.cores.len()
    }
}

/// The NUMA node of the PCI device at bus id `address` (`0000:65:00.0`), from sysfs: where a
/// GPU's host-side threads and buffers belong. `None` when unknown.
pub fn pci_numa_node(address: &str) -> Option<usize> {
    sysfs::pci_numa_node(Path::new("/sys"), address)
}

impl Topology {
    fn discover() -> Topology {
        #[cfg(feature = "hwloc")]
        match hwloc::layout().map(|layout| Self::from_layout(layout, "hwloc")) {
            Ok(t) if t.can_pin() => return t,
            Ok(t) => tracing::debug!(why = %t.summary(), "hwloc found no core; reading sysfs"),
            Err(why) => tracing::debug!(%why, "hwloc found no topology; reading sysfs"),
        }
        // Respect an affinity the process was started with (taskset, a container's cpuset):
        // pinning outside it would escape what the user asked for. Discovery runs before the
        // pool pins anything, so this is the launcher's mask.
        let allowed = match affinity::current_thread() {
            Ok(cpus) => cpus,
            Err(e) => return Self::unavailable(format!("sched_getaffinity failed: {e}")),
        };
        match sysfs::read(Path::new("/sys"), &allowed) {
            Ok(layout) => Self::from_layout(layout, "sysfs"),
            Err(e) => Self::unavailable(format!("sysfs: {e}")),
        }
    }

    fn unavailable(why: String) -> Topology {
        Topology {
            cores: Vec::new(),
            numa_nodes: 0,
            pus: 0,
            source: "none",
            unavailable: Some(why),
        }
    }

    fn from_layout(layout: Layout, source: &'static str) -> Topology {
        let per_node: Vec<Vec<Core>> = layout
            .per_node
            .into_iter()
            .filter(|cpus| !cpus.is_empty())
            .enumerate()
            .map(|(numa_node, cpus)| {
                cpus.into_iter()
                    .map(|cpu| Core { cpu, numa_node })
                    .collect()
            })
            .collect();
        let numa_nodes = per_node.len();
        let cores = interleave(per_node);
        if cores.is_empty() {
            return Self::unavailable(format!("{source} reports no usable core"));
        }
        Topology {
            cores,
            numa_nodes,
            pus: layout.pus,
            source,
            unavailable: None,
        }
    }

    /// Physical cores in pinning order; empty when threads cannot be pinned here.
    pub fn cores(&self) -> &[Core] {
        &self.cores
    }

    /// NUMA nodes with usable cores (0 when unavailable).
    pub fn numa_nodes(&self) -> usize {
        self.numa_nodes
    }

    /// Whether threads can be pinned on this machine.
    pub fn can_pin(&self) -> bool {
        !self.cores.is_empty()
    }

    /// One line for logs: `8 physical cores (16 PUs) in 2 NUMA nodes (sysfs)`, or why there is
    /// no topology.
    pub fn summary(&self) -> String {
        match &self.unavailable {
            Some(why) => format!("topology unavailable ({why})"),
            None => {
                let mut s = format!(
                    "{} physical cores ({} PUs) in {} NUMA node{} ({})",
                    self.cores.len(),
                    self.pus,
                    self.numa_nodes,
                    if self.numa_nodes == 1 { "" } else { "s" },
                    self.source,
                );
                if self.numa_nodes > 1 {
                    let _ = write!(s, ", slots alternate between nodes");
                }
                s
            }
        }
    }

    /// Binds the calling thread to the core in `slot` (see [`Topology::cores`]).
    pub fn pin_current_thread(&self, slot: usize) -> Result<&Core, TopologyError> {
        if self.cores.is_empty() {
            return Err(self.unavailable_error());
        }
        let core = self.cores.get(slot).ok_or(TopologyError::NoSuchCore {
            slot,
            cores: self.cores.len(),
        })?;
        affinity::pin_current_thread(core.cpu).map_err(|e| TopologyError::Bind {
            cpu: core.cpu,
            reason: e.to_string(),
        })?;
        Ok(core)
    }

    /// The OS indices of the CPUs the calling thread may run on (its affinity mask).
    pub fn current_thread_cpus(&self) -> Result<Vec<usize>, TopologyError> {
        affinity::current_thread()
            .map_err(|e| TopologyError::Unavailable(format!("sched_getaffinity failed: {e}")))
    }

    fn unavailable_error(&self) -> TopologyError {
        TopologyError::Unavailable(
            self.unavailable
                .clone()
                .unwrap_or_else(|| "no topology".into()),
        )
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field(
                "cores",
                &self.cores.iter().map(|c| c.cpu).collect::<Vec<_>>(),
            )
            .field("numa_nodes", &self.numa_nodes)
            .field("source", &self.source)
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

/// Round-robin over the nodes' core lists: node 0's first core, node 1's first core, …, then
/// every node's second core, so any prefix of the result is spread as evenly as it can be.
fn interleave<T>(per_node: Vec<Vec<T>>) -> Vec<T> {
    let total = per_node.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = per_node.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for it in &mut iters {
            if let Some(x) = it.next() {
                out.push(x);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_spreads_prefixes_over_nodes() {
        let nodes = vec![vec![0, 1, 2, 3], vec![10, 11], vec![20]];
        assert_eq!(interleave(nodes), vec![0, 10, 20, 1, 11, 2, 3]);
        assert_eq!(interleave::<u8>(vec![]), Vec::<u8>::new());
        assert_eq!(interleave(vec![vec![], vec![5]]), vec![5]);
    }

    #[test]
    fn layouts_become_interleaved_cores_without_empty_nodes() {
        let t = Topology::from_layout(
            Layout {
                per_node: vec![vec![0, 2], vec![], vec![8]],
                pus: 6,
            },
            "test",
        );
        let cores: Vec<(usize, usize)> = t.cores().iter().map(|c| (c.cpu, c.numa_node)).collect();
        assert_eq!(cores, vec![(0, 0), (8, 1), (2, 0)]);
        assert_eq!(t.numa_nodes(), 2);
        assert_eq!(
            t.summary(),
            "3 physical cores (6 PUs) in 2 NUMA nodes (test), slots alternate between nodes"
        );

        let none = Topology::from_layout(
            Layout {
                per_node: vec![vec![]],
                pus: 0,
            },
            "test",
        );
        assert!(!none.can_pin());
        assert!(none.summary().contains("test reports no usable core"));
        assert!(matches!(
            none.pin_current_thread(0),
            Err(TopologyError::Unavailable(_))
        ));
    }

    #[test]
    fn discovery_is_consistent() {
        let t = get();
        let n = physical_cores();
        assert!(n >= 1);
        if t.can_pin() {
            assert_eq!(n, t.cores().len());
            assert!(t.numa_nodes() >= 1);
            assert!(t.cores().iter().all(|c| c.numa_node < t.numa_nodes()));
            // One PU per core, no PU twice.
            let mut cpus: Vec<usize> = t.cores().iter().map(|c| c.cpu).collect();
            cpus.sort_unstable();
            cpus.dedup();
            assert_eq!(cpus.len(), n);
            assert!(t.summary().contains("physical cores"));
        } else {
            assert!(t.summary().contains("unavailable"));
            assert!(matches!(
                t.pin_current_thread(0),
                Err(TopologyError::Unavailable(_))
            ));
        }
        assert!(matches!(
            t.pin_current_thread(usize::MAX),
            Err(TopologyError::NoSuchCore { .. } | TopologyError::Unavailable(_))
        ));
    }

    #[test]
    fn pinning_a_thread_restricts_it_to_one_cpu() {
        let t = get();
        if !t.can_pin() {
            return;
        }
        let last = t.cores().len() - 1;
        // A scratch thread, so the test runner's threads keep their affinity.
        let r = std::thread::spawn(move || {
            let core = t.pin_current_thread(last).map(|c| c.cpu);
            (core, t.current_thread_cpus())
        })
        .join();
        let Ok((core, cpus)) = r else {
            panic!("pinning thread panicked")
        };
        match core {
            Ok(cpu) => assert_eq!(cpus, Ok(vec![cpu])),
            // A sandbox may forbid sched_setaffinity.
            Err(e) => assert!(matches!(e, TopologyError::Bind { .. }), "{e}"),
        }
    }
}
