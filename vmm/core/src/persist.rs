//! How a device goes into a snapshot and comes back out of one, in Firecracker's shape: each
//! device saves its own state and rebuilds itself from it, so the snapshot code never needs to
//! know what kinds of devices there are.

pub trait Persist: Sized {
    /// What goes into the state file.
    type State;
    /// What a restore needs besides the state: what cannot be saved (file descriptors, guest
    /// memory, the VM's interrupt lines).
    type ConstructorArgs;
    type Error;

    fn save(&self) -> Self::State;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
