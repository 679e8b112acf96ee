"""Small host-side helpers shared by every layer (devices, pv, daemon), at the bottom of the import graph: nothing
here imports another kvmdm module, and nothing here touches KVM (kvmcore's ctypes stay in kvmcore._abi).

* :mod:`.ratelimit` — logging a guest cannot turn into a host denial of service;
* :mod:`.fdpass` — SCM_RIGHTS packing and unpacking, the one implementation (control socket, vhost-user);
* :mod:`.guest_build` — the assembler/linker recipe for the demo and test guests.
"""
