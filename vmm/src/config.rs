//! What a VM is made of, as the user asked for it.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Appended to ember's default command line.
    pub cmdline: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
}
