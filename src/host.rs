//! What the kubelet reads from the host once at start and writes into
//! every container config: the machine's memory (for the Burstable OOM
//! score), the cgroup hierarchy and swap controller (for `unified` and the
//! swap limit), the huge page sizes (each gets a zero hugetlb limit), and
//! the CPUs' `thermal_throttle` directories (masked since Kubernetes 1.36).
//! [`HostFacts::detect`] does the reading; everything else takes the facts
//! as data, so translation stays pure and tests give their own.

use std::path::Path;

/// The host as the kubelet sees it at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `MemTotal` in bytes (cadvisor's machine memory capacity, the
    /// kubelet's `machineInfo.MemoryCapacity`); 0 when unknown.
    pub memory_capacity: i64,
    /// `/sys/fs/cgroup` is a cgroup v2 (unified) mount.
    pub cgroup2: bool,
    /// The memory controller limits swap: `memory.memsw.limit_in_bytes`
    /// (v1) or `memory.swap.max` in this process's cgroup (v2), as the
    /// kubelet's `checkSwapControllerAvailability` looks.
    pub swap_controller: bool,
    /// Huge page sizes in the CRI's spelling (`2MB`, `1GB`), smallest first.
    pub hugepage_sizes: Vec<String>,
    /// `/sys/devices/system/cpu/cpuN/thermal_throttle` directories that
    /// exist, by CPU number (the kubelet masks them with the defaults).
    pub thermal_throttle: Vec<String>,
}

impl HostFacts {
    /// Reads the facts from this host's `/proc` and `/sys`. What cannot be
    /// read is left at its default (as the kubelet's own readers do: no
    /// huge pages, cgroup v1, no swap controller, nothing extra masked).
    pub fn detect() -> HostFacts {
        Self::detect_under(Path::new("/"))
    }

    fn detect_under(root: &Path) -> HostFacts {
        let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
        let cgroup2 = read("proc/self/mounts").is_some_and(|m| cgroup2_mounted(&m));
        let swap_controller = if cgroup2 {
            read("proc/self/cgroup")
                .and_then(|c| unified_cgroup(&c).map(str::to_string))
                .is_some_and(|own| {
                    root.join("sys/fs/cgroup")
                        .join(own.trim_start_matches('/'))
                        .join("memory.swap.max")
                        .exists()
                })
        } else {
            root.join("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
                .exists()
        };
        let hugepage_sizes = std::fs::read_dir(root.join("sys/kernel/mm/hugepages"))
            .map(|d| {
                hugepage_sizes(
                    d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                )
            })
            .unwrap_or_default();
        let cpus = read("sys/devices/system/cpu/possible")
            .and_then(|s| cpu_list(&s))
            .unwrap_or_else(|| {
                (0..std::thread::available_parallelism().map_or(1, |n| n.get()) as u32).collect()
            });
        let thermal_throttle = cpus
            .into_iter()
            .map(|cpu| format!("/sys/devices/system/cpu/cpu{cpu}/thermal_throttle"))
            .filter(|p| root.join(p.trim_start_matches('/')).exists())
            .collect();
        HostFacts {
            memory_capacity: read("proc/meminfo")
                .and_then(|m| mem_total(&m))
                .unwrap_or(0),
            cgroup2,
            swap_controller,
            hugepage_sizes,
            thermal_throttle,
        }
    }
}

/// Whether the mount at `/sys/fs/cgroup` is cgroup2 (runc's
/// `IsCgroup2UnifiedMode` asks statfs; the topmost mount there, the last
/// listed in `/proc/self/mounts`, is what statfs sees).
fn cgroup2_mounted(mounts: &str) -> bool {
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
        (at == "/sys/fs/cgroup").then_some(fstype)
    }) == Some("cgroup2")
}

/// The path of the unified hierarchy's line (`0::/path`) of `/proc/self/cgroup`.
fn unified_cgroup(self_cgroup: &str) -> Option<&str> {
    self_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// `MemTotal:  24683784 kB` in bytes.
fn mem_total(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `hugepages-2048kB` directory names as runc's `HugePageSizes` spells
/// them (`2MB`; sizes of at least 1 GiB in GB, of 1 MiB in MB, else KB),
/// sorted by size; names that do not parse are skipped.
pub fn hugepage_sizes<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut kbs: Vec<u64> = names
        .filter_map(|n| {
            n.strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()
        })
        .collect();
    kbs.sort_unstable();
    kbs.dedup();
    kbs.into_iter()
        .map(|kb| {
            if kb >= 1 << 20 {
                format!("{}GB", kb >> 20)
            } else if kb >= 1 << 10 {
                format!("{}MB", kb >> 10)
            } else {
                format!("{kb}KB")
            }
        })
        .collect()
}

/// A kernel CPU list (`0-3,8,10-11`); `None` when it does not parse.
pub fn cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            None => out.push(part.parse().ok()?),
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                // A list that runs backwards is not one the kernel writes.
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepage_directory_names_become_runc_page_sizes() {
        let table: [(&[&str], &[&str]); 4] = [
            (
                &["hugepages-1048576kB", "hugepages-2048kB"],
                &["2MB", "1GB"],
            ),
            (&["hugepages-64kB", "hugepages-32768kB"], &["64KB", "32MB"]),
            (
                &["hugepages-2048kB", "nr_hugepages", "hugepages-xkB"],
                &["2MB"],
            ),
            (&[], &[]),
        ];
        for (names, want) in table {
            assert_eq!(hugepage_sizes(names.iter().copied()), want, "{names:?}");
        }
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        let table: [(&str, Option<Vec<u32>>); 5] = [
            ("0-1\n", Some(vec![0, 1])),
            ("0", Some(vec![0])),
            ("0-2,5,7-8", Some(vec![0, 1, 2, 5, 7, 8])),
            ("3-1", None),
            ("x", None),
        ];
        for (s, want) in table {
            assert_eq!(cpu_list(s), want, "{s:?}");
        }
    }

    #[test]
    fn memory_and_cgroup_of_a_fake_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let put = |p: &str, body: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        put("proc/meminfo", "MemTotal:        2048 kB\nMemFree: 1 kB\n");
        put("sys/devices/system/cpu/possible", "0-2\n");
        put("sys/devices/system/cpu/cpu1/thermal_throttle/x", "");
        put("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "0");
        std::fs::create_dir_all(root.join("sys/kernel/mm/hugepages/hugepages-2048kB")).unwrap();
        let facts = HostFacts::detect_under(root);
        assert_eq!(
            facts,
            HostFacts {
                memory_capacity: 2048 * 1024,
                cgroup2: false,
                swap_controller: true,
                hugepage_sizes: vec!["2MB".into()],
                thermal_throttle: vec!["/sys/devices/system/cpu/cpu1/thermal_throttle".into()],
            }
        );
        assert_eq!(
            unified_cgroup("1:cpu:/\n0::/kubepods/x\n"),
            Some("/kubepods/x")
        );
    }
}
