//! Giving back to the host what building or restoring a VM, and answering API calls,
//! allocated and freed: it would otherwise stay resident for the VM's whole life, and every
//! idle VM's VMM counts against the host's density.

/// Gives the heap's free pages back to the host.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Gives the pages of this thread's stack below the current frame back to the host. They hold
/// nothing live (the stack grows down); a deeper call later faults in zeroed pages again.
/// Never inlined, so that its small frame is the last one and the address of its local marks
/// where the live stack ends.
#[inline(never)]
pub fn trim_stack() {
    // Room for this frame and the madvise call below it.
    const KEEP: usize = 4 << 10;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let (mut lowest, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: attr is initialised by pthread_getattr_np before it is read, and destroyed after.
    let known = unsafe {
        let ok = libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) == 0;
        if ok {
            libc::pthread_attr_getstack(attr.as_ptr(), &mut lowest, &mut size);
            libc::pthread_attr_destroy(attr.as_mut_ptr());
        }
        ok
    };
    let here = &attr as *const _ as usize;
    let page = 4096;
    let end = here.saturating_sub(KEEP) & !(page - 1);
    let start = (lowest as usize).next_multiple_of(page);
    if !known || start >= end {
        return;
    }
    // SAFETY: the range lies in this thread's stack below every live frame, so nothing in it
    // is in use; MADV_DONTNEED only drops its pages. Parts of it not mapped yet are skipped.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}
