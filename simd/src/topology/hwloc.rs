//! The topology as hwloc sees it (the `hwloc` cargo feature): the same [`Layout`] that
//! [`super::sysfs`] reads, for machines where hwloc knows more than sysfs says.

use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;

use super::Layout;

/// The cores of the CPUs the calling thread may run on, one representative PU each (the
/// lowest allowed one), grouped by hwloc's NUMA nodes.
pub(super) fn layout() -> Result<Layout, String> {
    let hw = hwlocality::Topology::new().map_err(|e| format!("hwloc discovery failed: {e}"))?;
    // The launcher's affinity mask (taskset, a container's cpuset); discovery runs before the
    // pool pins anything.
    let allowed: Option<CpuSet> = hw.cpu_binding(CpuBindingFlags::THREAD).ok();
    let nodes: Vec<CpuSet> = hw
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|n| n.cpuset().map(|c| c.clone_target()))
        .collect();
    let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len().max(1)];
    let mut pus = 0;
    for core in hw.objects_with_type(ObjectType::Core) {
        let Some(set) = core.cpuset() else { continue };
        let mut set = set.clone_target();
        if let Some(allowed) = &allowed {
            set &= allowed;
        }
        pus += set.weight().unwrap_or(0);
        // One PU per core, the lowest-numbered one.
        set.singlify();
        let Some(cpu) = set.first_set() else { continue };
        let node = nodes.iter().position(|n| n.includes(&set)).unwrap_or(0);
        per_node[node].push(usize::from(cpu));
    }
    Ok(Layout { per_node, pus })
}
