//! The guest's heap: a first-fit allocator over the memory between the end
//! of the image and the end of guest RAM.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;

use linked_list_allocator::Heap;

/// A heap for a single-threaded guest without interrupts: no lock needed.
pub struct GuestHeap(UnsafeCell<Heap>);

// SAFETY: the guest has one vCPU and no interrupt or exception handlers, so
// the heap is never accessed concurrently.
unsafe impl Sync for GuestHeap {}

// SAFETY: allocate_first_fit/deallocate implement the GlobalAlloc contract;
// exclusive access follows from the single-threaded guest (see Sync above).
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: exclusive access, see above.
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc
            // contract); exclusive access, see above.
            unsafe { (*self.0.get()).deallocate(ptr, layout) }
        }
    }
}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap(UnsafeCell::new(Heap::empty()));

unsafe extern "C" {
    static __heap_start: u8;
}

/// Gives the heap all memory from the end of the image to the end of RAM.
/// Call once, before the first allocation.
pub fn init() {
    let start = core::ptr::addr_of!(__heap_start) as usize;
    let end = crate::pv::mem_size() as usize;
    // SAFETY: [start, end) is guest RAM that nothing else uses: the image
    // ends at __heap_start (linker script), the stack and boot structures
    // lie below the image. Called once, before any allocation.
    unsafe { (*HEAP.0.get()).init(start as *mut u8, end.saturating_sub(start)) }
}

/// Bytes of the heap not allocated now (possibly in several pieces).
pub fn free_bytes() -> usize {
    // SAFETY: exclusive access, see `GuestHeap`'s Sync; `free` only reads.
    unsafe { (*HEAP.0.get()).free() }
}
