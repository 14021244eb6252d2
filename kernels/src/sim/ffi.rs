//! The C ABI of the simulator's runtime (`kernels/sim/sim.cpp` and the generated tables), or
//! stand-ins that say it is missing where the build could not make it.

use std::collections::HashMap;

use crate::device::LaunchConfig;

pub(crate) const FLAG_RACES: u32 = 1;
pub(crate) const FLAG_HOST: u32 = 2;

#[cfg(strata_sim)]
mod imp {
    use std::collections::HashMap;
    use std::ffi::{CStr, c_char, c_void};

    use crate::device::LaunchConfig;

    #[repr(C)]
    struct SimKernel {
        name: *const c_char,
        thunk: *const c_void,
        tu: u32,
    }

    #[repr(C)]
    struct SimLaunch {
        kernel: u32,
        grid: [u32; 3],
        block: [u32; 3],
        seed: u64,
        params: *mut *mut c_void,
        flags: u32,
    }

    unsafe extern "C" {
        fn strata_sim_kernels(n: *mut usize) -> *const SimKernel;
        fn strata_sim_launch(l: *const SimLaunch, err: *mut c_char, err_len: usize) -> i32;
        fn strata_sim_register_arena(base: usize, size: usize, shadow: *const u8);
        fn strata_sim_unregister_arena(base: usize);
    }

    pub(crate) const AVAILABLE: bool = true;

    pub(crate) fn kernels() -> HashMap<String, u32> {
        let mut n = 0usize;
        // SAFETY: the generated table is a static array of `n` entries with static C strings.
        let table = unsafe { strata_sim_kernels(&mut n) };
        let mut map = HashMap::new();
        for i in 0..n {
            // SAFETY: i < n, within the static table.
            let k = unsafe { &*table.add(i) };
            if k.name.is_null() {
                continue;
            }
            // SAFETY: a NUL-terminated string literal of the generated table.
            let name = unsafe { CStr::from_ptr(k.name) };
            map.insert(name.to_string_lossy().into_owned(), i as u32);
        }
        map
    }

    pub(crate) fn register_arena(base: u64, size: u64, shadow: *const u8) {
        // SAFETY: the arena outlives its registration (unregistered in SimDevice's drop).
        unsafe { strata_sim_register_arena(base as usize, size as usize, shadow) };
    }

    pub(crate) fn unregister_arena(base: u64) {
        // SAFETY: removes an entry; no memory is touched.
        unsafe { strata_sim_unregister_arena(base as usize) };
    }

    pub(crate) fn launch(
        kernel: u32,
        cfg: LaunchConfig,
        args: &mut [u64],
        seed: u64,
        flags: u32,
    ) -> Result<(), String> {
        let mut params = [std::ptr::null_mut::<c_void>(); crate::sim::MAX_ARGS];
        for (p, a) in params.iter_mut().zip(args.iter_mut()) {
            *p = std::ptr::from_mut(a).cast::<c_void>();
        }
        let l = SimLaunch {
            kernel,
            grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
            block: [cfg.block.0, cfg.block.1, cfg.block.2],
            seed,
            params: params.as_mut_ptr(),
            flags,
        };
        let mut err = [0 as c_char; 2048];
        // SAFETY: `l` and the parameter slots live across the call; the kernel reads each
        // parameter through its pointer with the width its signature gives (at most 8 bytes);
        // the error buffer's length is passed.
        let rc = unsafe { strata_sim_launch(&l, err.as_mut_ptr(), err.len()) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the runtime wrote a NUL-terminated message into `err` (snprintf).
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        Err(msg.to_string_lossy().into_owned())
    }
}

#[cfg(not(strata_sim))]
mod imp {
    use std::collections::HashMap;

    use crate::device::LaunchConfig;

    pub(crate) const AVAILABLE: bool = false;

    pub(crate) fn kernels() -> HashMap<String, u32> {
        HashMap::new()
    }

    pub(crate) fn register_arena(_: u64, _: u64, _: *const u8) {}

    pub(crate) fn unregister_arena(_: u64) {}

    pub(crate) fn launch(
        _: u32,
        _: LaunchConfig,
        _: &mut [u64],
        _: u64,
        _: u32,
    ) -> Result<(), String> {
        Err("the GPU simulator is not part of this build".into())
    }
}

pub(crate) const AVAILABLE: bool = imp::AVAILABLE;

pub(crate) fn kernels() -> HashMap<String, u32> {
    imp::kernels()
}

pub(crate) fn register_arena(base: u64, size: u64, shadow: *const u8) {
    imp::register_arena(base, size, shadow);
}

pub(crate) fn unregister_arena(base: u64) {
    imp::unregister_arena(base);
}

pub(crate) fn launch(
    kernel: u32,
    cfg: LaunchConfig,
    args: &mut [u64],
    seed: u64,
    flags: u32,
) -> Result<(), String> {
    imp::launch(kernel, cfg, args, seed, flags)
}
