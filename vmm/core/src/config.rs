//! What a VM is made of, as the user asked for it.

use std::path::PathBuf;
use std::str::FromStr;

use disk::{BackingPolicy, Format};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Appended to ember's default command line.
    pub cmdline: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// virtio-blk disks, in the order the guest sees them (/dev/vda, /dev/vdb, ...).
    pub drives: Vec<DriveConfig>,
    pub vsock: Option<VsockConfig>,
    /// Where the backing files of the drives' qcow2 layers may lie.
    pub backing: BackingPolicy,
}

/// A virtio-vsock device bridged to Unix sockets, Firecracker-style: host clients connect to
/// `uds` and write `CONNECT <port>`; guest connections to the host's port P reach `<uds>_P`.
/// Also what a snapshot keeps of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub uds: PathBuf,
}

/// A virtio-blk drive, whether from `--drive`, from the API (PUT /drives) or from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// The API's drive_id, by which a running VM's drive is updated (PATCH /drives/{id}).
    pub id: Option<String>,
    pub path: PathBuf,
    pub read_only: bool,
    /// The guest mounts this drive as its root filesystem.
    pub root: bool,
    /// The format of the file at `path`, as whoever configured the drive said: never taken
    /// from the file's content, which the guest writes.
    pub format: Format,
}

/// The API's disk format as the disk code knows it.
pub fn disk_format(f: api::models::DiskFormat) -> Format {
    match f {
        api::models::DiskFormat::Raw => Format::Raw,
        api::models::DiskFormat::Qcow2 => Format::Qcow2,
    }
}

/// The disk code's format as the API publishes it.
pub fn api_format(f: Format) -> api::models::DiskFormat {
    match f {
        Format::Raw => api::models::DiskFormat::Raw,
        Format::Qcow2 => api::models::DiskFormat::Qcow2,
    }
}

/// Firecracker's wire shape of a drive; the options it has and ember does not were refused
/// when the request was parsed. A drive without a format is raw, as in Firecracker.
impl From<api::models::Drive> for DriveConfig {
    fn from(d: api::models::Drive) -> Self {
        Self {
            id: Some(d.drive_id),
            path: d.path_on_host.into(),
            read_only: d.is_read_only,
            root: d.is_root_device,
            format: disk_format(d.format.unwrap_or_default()),
        }
    }
}

impl From<api::models::Vsock> for VsockConfig {
    fn from(v: api::models::Vsock) -> Self {
        Self { cid: v.guest_cid, uds: v.uds_path.into() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("'{0}' is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("{key}={value}: expected on or off")]
    OnOff { key: String, value: String },
    #[error("unknown or empty drive option '{0}' (known: path, ro, root, id, format)")]
    DriveOption(String),
    #[error("a drive needs path=FILE")]
    NoPath,
    #[error("format={0}: expected raw or qcow2")]
    Format(String),
    #[error(
        "drive {0}: cannot tell its format from its name (.qcow2, or .raw, .img, .ext4 for raw): add format=raw or format=qcow2"
    )]
    NoFormat(PathBuf),
    #[error("cid={value}: {source}")]
    Cid { value: String, source: std::num::ParseIntError },
    #[error("unknown or empty vsock option '{0}' (known: cid, uds)")]
    VsockOption(String),
    #[error("a vsock device needs cid=N")]
    NoCid,
    #[error("a vsock device needs uds=PATH")]
    NoUds,
}

fn on_off(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::OnOff { key: key.into(), value: value.into() }),
    }
}

/// `path=FILE[,ro=on|off][,root=on|off][,format=raw|qcow2]`, as `--drive` takes it; without
/// format=, the file name's extension says it (`.qcow2`; `.raw`, `.img`, `.ext4`), or it is an
/// error.
impl FromStr for DriveConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (mut path, mut id, mut format) = (None, None, None);
        let (mut read_only, mut root) = (false, false);
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| ConfigError::NotKeyValue(part.into()))?;
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "ro" => read_only = on_off(key, value)?,
                "root" => root = on_off(key, value)?,
                "id" if !value.is_empty() => id = Some(value.to_string()),
                "format" => format = Some(value.parse().map_err(|_| ConfigError::Format(value.into()))?),
                _ => return Err(ConfigError::DriveOption(part.into())),
            }
        }
        let path: PathBuf = path.ok_or(ConfigError::NoPath)?;
        let format = match format.or_else(|| Format::from_extension(&path)) {
            Some(f) => f,
            None => return Err(ConfigError::NoFormat(path)),
        };
        Ok(Self { id, path, read_only, root, format })
    }
}

/// `cid=N,uds=PATH`, as `--vsock` takes it.
impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (mut cid, mut uds) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u32>().map_err(|source| ConfigError::Cid { value: v.into(), source })?)
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(ConfigError::VsockOption(part.into())),
            }
        }
        Ok(Self { cid: cid.ok_or(ConfigError::NoCid)?, uds: uds.ok_or(ConfigError::NoUds)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options() {
        let d: DriveConfig = "path=/x/y.qcow2,ro=on,root=on".parse().unwrap();
        assert_eq!(d, DriveConfig { id: None, path: "/x/y.qcow2".into(), read_only: true, root: true, format: Format::Qcow2 });
        let d: DriveConfig = "path=disk.img".parse().unwrap();
        assert_eq!(d, DriveConfig { id: None, path: "disk.img".into(), read_only: false, root: false, format: Format::Raw });
        // The caller's word over the name; no name, no guess.
        assert_eq!("path=disk.qcow2,format=raw".parse::<DriveConfig>().unwrap().format, Format::Raw);
        assert_eq!("path=disk,format=qcow2".parse::<DriveConfig>().unwrap().format, Format::Qcow2);
        assert!("path=disk".parse::<DriveConfig>().unwrap_err().to_string().contains("add format=raw"));
        assert!("path=a.raw,format=vmdk".parse::<DriveConfig>().unwrap_err().to_string().contains("raw or qcow2"));
        assert!("ro=on".parse::<DriveConfig>().unwrap_err().to_string().contains("path="));
        assert!("path=a,ro=maybe".parse::<DriveConfig>().unwrap_err().to_string().contains("on or off"));
        assert!("path=a,cache=none".parse::<DriveConfig>().unwrap_err().to_string().contains("unknown"));
        assert!("path=".parse::<DriveConfig>().is_err());
        assert!("path=a,bogus".parse::<DriveConfig>().unwrap_err().to_string().contains("KEY=VALUE"));
    }

    #[test]
    fn vsock_options() {
        let v: VsockConfig = "cid=7,uds=/run/v.sock".parse().unwrap();
        assert_eq!(v, VsockConfig { cid: 7, uds: "/run/v.sock".into() });
        assert!("uds=/x".parse::<VsockConfig>().unwrap_err().to_string().contains("cid=N"));
        assert!("cid=3".parse::<VsockConfig>().unwrap_err().to_string().contains("uds=PATH"));
        assert!("cid=x,uds=/x".parse::<VsockConfig>().unwrap_err().to_string().contains("cid=x"));
        assert!("cid=3,uds=/x,port=1".parse::<VsockConfig>().unwrap_err().to_string().contains("unknown"));
    }
}
