//! OCI and Docker images made into ember base images.
//!
//! An image comes from an OCI image layout directory, a `docker save` archive or a registry;
//! its manifest for linux/amd64 is chosen, every blob checked against its digest, its layers
//! applied in order onto a staging tree (`apply`, through `tree`, which keeps every write
//! inside it), ember's own files added, and an ext4 file system of the requested capacity made
//! from the tree. Images are stored content-addressed by manifest digest and named `name:tag`.

pub mod apply;
pub mod digest;
pub mod error;
pub mod tree;

pub use error::{ImageError, LayerError};
pub mod build;
pub mod credentials;
pub mod oci;
pub mod registry;
pub mod source;
pub mod store;

pub use credentials::Credentials;
pub use build::{build, find_agent, BuildOptions, BuildTimes, ScratchDir};
pub use registry::{pull, PullOptions, PullStats};
pub use source::{from_docker_archive, from_layout, Resolved};
pub use store::{normalize, Entry, ExecDefaults, Store};
