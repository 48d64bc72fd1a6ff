"""Kernel and architecture values, written once (STYLE §2.1).

KVM ABI numbers (VM types, exit reasons, capabilities, memory flags and attributes), TDVMCALL
statuses, S-EPT entry bit positions, PAMT page types and the model's own bounds. Stdlib-only:
``setup.py`` runs this file standalone to generate ``_defs.h`` for the Cython cores.

Sources: ``include/uapi/linux/kvm.h`` and ``arch/x86/kvm/vmx/tdx.c`` (Linux 6.18), the GHCI spec,
the TDX module 1.5 ABI (tdx-facts §1–§10, anchors §2.3).
"""

from __future__ import annotations

import enum

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SEPT_ENTRIES_PER_TABLE = 512
SEPT_LEVEL_BITS = 9
#: Largest module level number (256T); ``TdxLevel`` values are 0..SEPT_MAX_LEVEL.
SEPT_MAX_LEVEL = 4
#: GPA width per S-EPT depth: 4-level ↔ GPAW 48 (shared bit 47), 5-level ↔ GPAW 52 (bit 51).
GPAW_BY_LEVELS = {4: 48, 5: 52}
#: Model-wide bound on guest frame numbers (SPEC §7: a gfn ≥ 2^52 is out of range).
MAX_GFN = 1 << 52
#: Model-wide bound on host frame numbers (40-bit PFN, as the PAMT owner field).
MAX_PFN = 1 << 40
U64_MAX = (1 << 64) - 1

# --------------------------------------------------------------------------------------------
# S-EPT entry bits (module encoding: bit0=D(9) bit1=TDEX(53) bit2=TDBW(54) bit3=TDB(55)
# bit4=TDP(56) bit5=IPAT(6) bit6=PS(7); reference/README.md)
# --------------------------------------------------------------------------------------------
SEPT_BIT_D = 9
SEPT_BIT_TDEX = 53
SEPT_BIT_TDBW = 54
SEPT_BIT_TDB = 55
SEPT_BIT_TDP = 56
SEPT_BIT_IPAT = 6
SEPT_BIT_PS = 7
#: Suppress-#VE: the module fills new S-EPT pages with FREE bits plus this bit.
SEPT_BIT_SVE = 63
#: Encoding bit i comes from entry bit SEPT_STATE_BITS[i].
SEPT_STATE_BITS = (SEPT_BIT_D, SEPT_BIT_TDEX, SEPT_BIT_TDBW, SEPT_BIT_TDB, SEPT_BIT_TDP,
                   SEPT_BIT_IPAT, SEPT_BIT_PS)
#: Bits 51:12 of an entry hold the frame (mapped page or child S-EPT page).
SEPT_PFN_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)

# level_state (RDX on S-EPT errors): bits 2:0 level, bits 15:8 public state.
LEVEL_STATE_STATE_SHIFT = 8

#: VMX exit reason of an EPT violation. ``SeptTree.page_accept`` returns
#: ``TDX_SUCCESS | EXIT_REASON_EPT_VIOLATION`` (what TDH.VP.ENTER reports for that TD exit)
#: when the guest's ACCEPT must exit to the host instead (SPEC §4.2).
EXIT_REASON_EPT_VIOLATION = 48
ACCEPT_EPT_VIOLATION = EXIT_REASON_EPT_VIOLATION

# --------------------------------------------------------------------------------------------
# PAMT (tdx-facts §5.9)
# --------------------------------------------------------------------------------------------


class PageType(enum.IntEnum):
    """PAMT page types."""

    PT_NDA = 0
    PT_RSVD = 1
    PT_REG = 3
    PT_TDR = 4
    PT_TDCX = 5
    PT_TDVPR = 6
    PT_EPT = 8


#: Owner field of a frame that has no owning TDR (NDA, RSVD, and TDR pages themselves).
PAMT_NO_OWNER = U64_MAX

# --------------------------------------------------------------------------------------------
# Module bring-up: TDMRs and PAMTs (module 1.5 sysinfo; tdx-facts §5.9, §6)
# --------------------------------------------------------------------------------------------
#: ``MAX_TDMRS``: TDMRs TDH.SYS.CONFIG accepts.
MAX_TDMRS = 64
#: ``MAX_RESERVED_AREAS`` per TDMR.
MAX_RESERVED_AREAS = 16
#: Bytes per PAMT entry at every level (``PAMT_{4K,2M,1G}_ENTRY_SIZE``; tdx-facts §5.9).
PAMT_ENTRY_SIZE = 16
#: TDMR base/size granularity (1 GiB).
TDMR_ALIGN = 1 << 30
#: Bytes of one TDMR_INFO slot (header 8 x u64 + 16 reserved areas, rounded to the alignment).
TDMR_INFO_SIZE = 512
#: Alignment of the TDMR_INFO PA array and of each TDMR_INFO.
TDMR_INFO_ALIGN = 512
#: 4K PAMT entries one TDH.SYS.TDMR.INIT initializes (module ``TDMR_4K_PAMT_INIT_COUNT``).
TDMR_INIT_PAMT_ENTRIES = 1024
#: Page-size shifts of the three PAMT levels, in TDMR_INFO order of allocation (4K, 2M, 1G).
PAMT_LEVEL_SHIFTS = (12, 21, 30)
#: Frames below 1 MiB are never TDX memory (tdx-facts §6.2: each memblock minus the first 1 MiB).
LOW_RESERVED_FRAMES = (1 << 20) >> PAGE_SHIFT

# --------------------------------------------------------------------------------------------
# Busy try-lock word (STYLE §2.6; anchors §2.3 lock table)
# --------------------------------------------------------------------------------------------
#: Bit 63: held exclusively.
BUSYLOCK_EXCL_BIT = 1 << 63
#: Bit 52: the host lost a try and asked for priority; a guest try then gets
#: ``TDX_OPERAND_BUSY_HOST_PRIORITY`` until the host acquires the lock.
BUSYLOCK_HOST_PRIORITY_BIT = 1 << 52
#: Low bits: number of shared holders.
BUSYLOCK_SHARED_MASK = (1 << 52) - 1

# --------------------------------------------------------------------------------------------
# KVM ABI (include/uapi/linux/kvm.h, 6.18)
# --------------------------------------------------------------------------------------------


class VmType(enum.IntEnum):
    """``KVM_CREATE_VM`` machine types on x86."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5


class ExitReason(enum.IntEnum):
    """``kvm_run.exit_reason`` values."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    MEMORY_FAULT = 39
    TDX = 40


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers used by the model."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MAX_VCPUS = 66
    SPLIT_IRQCHIP = 121
    VM_TYPES = 235
    EXIT_HYPERCALL = 201
    USER_MEMORY2 = 231
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    PRE_FAULT_MEMORY = 236


class HC(enum.IntEnum):
    """KVM hypercall numbers."""

    MAP_GPA_RANGE = 12


class MemFlag(enum.IntFlag):
    """``kvm_userspace_memory_region2.flags``."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class MemAttr(enum.IntFlag):
    """``KVM_MEMORY_ATTRIBUTE_*`` (bits 0–2 reserved for R/W/X)."""

    PRIVATE = 1 << 3


#: ``KVM_MEMORY_EXIT_FLAG_PRIVATE``
MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
#: ``KVM_SYSTEM_EVENT_TDX_FATAL``
SYSTEM_EVENT_TDX_FATAL = 7
#: ``KVM_MAP_GPA_RANGE_ENCRYPTED``
MAP_GPA_RANGE_ENCRYPTED = 1 << 4


class TdAttr(enum.IntFlag):
    """TD attributes (TD_PARAMS.ATTRIBUTES); KVM 6.18 supports only SEPT_VE_DISABLE."""

    DEBUG = 1 << 0
    SEPT_VE_DISABLE = 1 << 28
    PKS = 1 << 30
    KL = 1 << 31
    PERFMON = 1 << 63


class TdvmcallStatus(enum.IntEnum):
    """TDVMCALL completion statuses written to the guest's R10 (GHCI)."""

    SUCCESS = 0
    RETRY = 1
    INVALID_OPERAND = 0x8000000000000000
    GPA_INUSE = 0x8000000000000001
    ALIGN_ERROR = 0x8000000000000002
    SUBFUNC_UNSUPPORTED = 0x8000000000000003


class TdvmcallLeaf(enum.IntEnum):
    """GHCI TDVMCALL sub-functions (R11 with R10 = 0)."""

    CPUID = 10
    HLT = 12
    IO = 30
    MSR_READ = 31
    MSR_WRITE = 32
    MMIO = 48
    GET_TD_VM_CALL_INFO = 0x10000
    MAP_GPA = 0x10001
    GET_QUOTE = 0x10002
    REPORT_FATAL_ERROR = 0x10003
    SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004


# --------------------------------------------------------------------------------------------
# Retry bounds (tdx-facts §10; SPEC §4.1)
# --------------------------------------------------------------------------------------------
SEAMCALL_RETRY_MAX = 16
TRACK_RETRY_MAX = 10_000
TDX_SEAMCALL_RETRIES = 10_000
RDRAND_RETRY_LOOPS = 10
MAX_LOCAL_RETRIES = 1_000_000
ZERO_STEP_THRESHOLD = 6
MAP_GPA_MAX_LEN = 2 << 20
KVM_MAX_CPUID_ENTRIES = 256
MR_EXTEND_CHUNK = 256


# --------------------------------------------------------------------------------------------
# TD-scope module model (issue 4 items 3-4; tdx-facts §2.3, §3.4, §5.2-§5.3). Values the model
# chooses inside documented module bounds are marked "model".
# --------------------------------------------------------------------------------------------
#: TDCS pages per TD TDH.MNG.ADDCX must add before TDH.MNG.INIT (module bounds 6..9; model: 6).
TDCS_NR_PAGES = 6
#: TDVPS pages per vCPU: the TDVPR plus TDVPS_NR_PAGES - 1 TDCX pages via TDH.VP.ADDCX (model).
TDVPS_NR_PAGES = 6
#: Host MAXPHYADDR of the model: a KeyID sits in the PA bits from here up (tdx-facts §5.1; model).
MODEL_MAXPHYADDR = 46
#: Initial TDCS.TD_EPOCH set by TDH.MNG.INIT (model: 1, so a fresh page's BEPOCH 0 is E-1).
TD_EPOCH_INITIAL = 1
#: Largest TD_PARAMS.MAX_VCPUS TDH.MNG.INIT accepts (model; the module's MAX_VCPUS_PER_TD).
TD_MAX_VCPUS_LIMIT = 576
#: TD_PARAMS.ATTRIBUTES bits TDH.MNG.INIT accepts (model: the TdAttr bits above).
TD_ATTRIBUTES_SUPPORTED = (1 << 0) | (1 << 28) | (1 << 30) | (1 << 31) | (1 << 63)
#: TD_PARAMS.XFAM bits that must be set (x87, SSE) and bits that may be set (model: x87..AVX512,
#: PKRU, AMX), per the module's XFAM fixed0/fixed1 checks.
TD_XFAM_FIXED1 = 0x3
TD_XFAM_SUPPORTED = 0x602E7
#: TD_PARAMS.TSC_FREQUENCY in 25 MHz units: 100 MHz .. 10 GHz (tdx-facts §5.3).
TD_TSC_FREQUENCY_MIN = 4
TD_TSC_FREQUENCY_MAX = 400
#: TD_PARAMS alignment (1024 B, tdx-facts §2.3 MNG.INIT).
TD_PARAMS_ALIGN = 1024
#: VMX basic exit reasons the model's TD exits report in VP.ENTER's RAX low 32 bits.
#: VMX basic exit reason of an external interrupt (a kick's IPI)
EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_HLT = 12
EXIT_REASON_TDCALL = 77
#: Field ids TDH.MNG.RD answers (model ids; module metadata field ids are not in the reference):
#: the fields KVM 6.18 reads after MNG.INIT (TSC offset/multiplier) plus a few for tools.
MNG_RD_FIELD_ATTRIBUTES = 0
MNG_RD_FIELD_XFAM = 1
MNG_RD_FIELD_MAX_VCPUS = 2
MNG_RD_FIELD_NUM_VCPUS = 3
MNG_RD_FIELD_OP_STATE = 4
MNG_RD_FIELD_TD_EPOCH = 5
MNG_RD_FIELD_TSC_OFFSET = 10
MNG_RD_FIELD_TSC_MULTIPLIER = 11


# --------------------------------------------------------------------------------------------
# KVM memory containers: guest_memfd, memslots, fallocate, the ioctl ABI (issue 5 items 2-3).
# Sources: include/uapi/linux/kvm.h, include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h,
# include/uapi/linux/falloc.h, include/uapi/asm-generic/ioctl.h (Linux 6.18). Checked against the
# running 6.18 kernel by tests/kernel/test_real_kvm.py.
# --------------------------------------------------------------------------------------------


class GmemFlag(enum.IntFlag):
    """``kvm_create_guest_memfd.flags`` (``GUEST_MEMFD_FLAG_*``, new in 6.18)."""

    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


class FallocFlag(enum.IntFlag):
    """``fallocate(2)`` mode bits (``FALLOC_FL_*``)."""

    KEEP_SIZE = 0x01
    PUNCH_HOLE = 0x02
    NO_HIDE_STALE = 0x04
    COLLAPSE_RANGE = 0x08
    ZERO_RANGE = 0x10
    INSERT_RANGE = 0x20
    UNSHARE_RANGE = 0x40
    WRITE_ZEROES = 0x80


#: ``KVM_CAP_GUEST_MEMFD_FLAGS``: returns the guest_memfd flags the VM supports (6.18).
KVM_CAP_GUEST_MEMFD_FLAGS = 244
#: ``KVM_CAP_READONLY_MEM`` and ``KVM_CAP_MULTI_ADDRESS_SPACE``.
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
#: x86 ``KVM_MEM_SLOTS_NUM`` (SHRT_MAX) minus ``KVM_INTERNAL_MEM_SLOTS`` (3) = ``KVM_USER_MEM_SLOTS``,
#: the bound on ``(u16)slot`` and the answer to ``KVM_CAP_NR_MEMSLOTS``.
KVM_MEM_SLOTS_NUM = 32767
KVM_USER_MEM_SLOTS = 32764
#: x86 ``KVM_MAX_NR_ADDRESS_SPACES``: 2 (normal + SMM) only with ``CONFIG_KVM_SMM``; the 6.18
#: kernel the model is checked against is built without it (``KVM_CAP_MULTI_ADDRESS_SPACE``
#: answers 0 and ``slot >> 16 == 1`` is EINVAL there), so the model has one address space.
KVM_MAX_NR_ADDRESS_SPACES = 1
#: x86-64 ``TASK_SIZE_MAX`` with 4-level paging: ``access_ok`` bound on ``userspace_addr + size``.
KVM_TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
#: ``MAX_LFS_FILESIZE`` on 64-bit (``LLONG_MAX``): ``vfs_fallocate`` returns EFBIG past it.
KVM_MAX_LFS_FILESIZE = (1 << 63) - 1
#: Flags the v1 ``KVM_SET_USER_MEMORY_REGION`` accepts (``KVM_SET_USER_MEMORY_REGION_V1_FLAGS``).
KVM_MEM_V1_FLAGS = (1 << 0) | (1 << 1)

#: ``_IOC`` encoding (asm-generic/ioctl.h): nr bits 0-7, type 8-15, size 16-29, dir 30-31.
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2
KVMIO = 0xAE


class KvmIoctlNr(enum.IntEnum):
    """``nr`` of the KVM ioctls the model and the real-kernel test use (type ``KVMIO``)."""

    CREATE_VM = 0x01
    CHECK_EXTENSION = 0x03
    SET_USER_MEMORY_REGION = 0x46
    SET_USER_MEMORY_REGION2 = 0x49
    CREATE_GUEST_MEMFD = 0xD4


#: Struct sizes the ioctl numbers encode: ``kvm_userspace_memory_region`` (u32 slot, u32 flags,
#: u64 guest_phys_addr, u64 memory_size, u64 userspace_addr), ``..._region2`` (+ u64
#: guest_memfd_offset, u32 guest_memfd, u32 pad1, u64 pad2[14]), ``kvm_create_guest_memfd``
#: (u64 size, u64 flags, u64 reserved[6]).
KVM_MEMORY_REGION_SIZE = 32
KVM_MEMORY_REGION2_SIZE = 160
KVM_CREATE_GUEST_MEMFD_SIZE = 64

# --------------------------------------------------------------------------------------------
# KVM TDX VM lifecycle (kvm/tdx_vm.py, kvm/vcpu.py; issue 5) — appended section
# --------------------------------------------------------------------------------------------
#: ``sc_retry``: attempts of a SEAMCALL that keeps returning TDX_RND_NO_ENTROPY (arch/x86 tdx.h).
TDX_SC_RETRIES = 10
#: ``KVM_MAX_VCPUS`` on x86 (6.18) and ``KVM_MAX_VCPU_IDS`` (= 4 × KVM_MAX_VCPUS on x86).
KVM_MAX_VCPUS = 4096
KVM_MAX_VCPU_IDS = 4 * KVM_MAX_VCPUS
#: ``MAX_NR_RESERVED_IOAPIC_PINS``: the bound on KVM_CAP_SPLIT_IRQCHIP's args[0].
MAX_NR_RESERVED_IOAPIC_PINS = 48
#: ``KVM_EXIT_HYPERCALL_VALID_MASK``: hypercalls userspace may take (only MAP_GPA_RANGE, 12).
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << 12
#: ``KVM_SUPPORTED_TD_ATTRS`` (6.18 tdx.c): the one TD attribute KVM offers.
KVM_TDX_SUPPORTED_ATTRS = 1 << 28
#: ``struct kvm_tdx_init_vm.reserved`` u64 count (uapi 6.18).
KVM_TDX_INIT_VM_RESERVED = 12

# --------------------------------------------------------------------------------------------
# KVM TDP-MMU mirror, INIT_MEM_REGION and the 6.18 zap path (kvm/mmu.py, kvm/tdx_mmu.py) — appended
# --------------------------------------------------------------------------------------------
#: KVM's ``PG_LEVEL_4K``: ``pg_level`` numbering inside ``kvm/`` only (module level = pg_level - 1).
PG_LEVEL_4K = 1
#: ``TDX_EXTENDMR_CHUNKSIZE``: bytes one TDH.MR.EXTEND measures (16 per 4K page).
TDX_EXTENDMR_CHUNKSIZE = 256
#: ``KVM_TDX_MEASURE_MEMORY_REGION``: the only ``cmd.flags`` bit of KVM_TDX_INIT_MEM_REGION.
KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0

# --------------------------------------------------------------------------------------------
# TDVMCALL exits (kvm/exits.py; issue 7) — appended section. Sources: include/uapi/linux/kvm.h,
# include/uapi/linux/kvm_para.h, arch/x86/include/asm/msr-index.h, arch/x86/kvm/vmx/tdx.c (6.18),
# arch/x86/include/asm/shared/tdx.h (guest side), GHCI.
# --------------------------------------------------------------------------------------------
#: ``KVM_EXIT_HYPERCALL_LONG_MODE``: ``kvm_run.hypercall.flags`` bit 0 (64-bit hypercall).
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
#: ``KVM_MAP_GPA_RANGE_DECRYPTED``: args[2] of a MapGPA chunk converting to shared.
MAP_GPA_RANGE_DECRYPTED = 0
#: ``kvm_run.io.direction``: ``KVM_EXIT_IO_IN`` / ``KVM_EXIT_IO_OUT``.
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
#: ``KVM_HC_VAPIC_POLL_IRQ``: the one KVM hypercall besides MAP_GPA_RANGE the model answers (0).
KVM_HC_VAPIC_POLL_IRQ = 1
#: ``KVM_ENOSYS`` (kvm_para.h): an unknown/disabled KVM hypercall, returned as ``-KVM_ENOSYS``.
KVM_HC_ENOSYS = 1000
#: Linux's ``TDVMCALL_EXPOSE_REGS_MASK`` (RDX, RBX, RSI, RDI, R8-R15): the TDCALL RCX of the model's guest.
TDVMCALL_EXPOSE_REGS_MASK = 0xFFCC
#: ``user_tdvmcallinfo_1_r11`` bit advertising SetupEventNotifyInterrupt to the guest (6.18).
TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT = 1 << 1
#: ``KVM_MAX_MCE_BANKS``: bound of the MCx_CTL / MCx_CTL2 MSR ranges KVM emulates.
KVM_MAX_MCE_BANKS = 32
#: MSR indexes KVM treats specially for a TD (msr-index.h): read-only ones, FEAT_CTL's value.
MSR_IA32_APICBASE = 0x1B
MSR_IA32_FEAT_CTL = 0x3A
MSR_EFER = 0xC0000080
MSR_IA32_MCG_EXT_CTL = 0x4D0
MSR_IA32_CR_PAT = 0x277
#: ``FEAT_CTL_LOCKED``: what RDMSR(FEAT_CTL) returns for a TD without LMCE.
FEAT_CTL_LOCKED = 1 << 0
#: x2APIC MSR range (``APIC_BASE_MSR`` .. + 0xff); KVM's MSR filter never applies to it.
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_LAST = 0x8FF
#: Single MSRs ``tdx_has_emulated_msr`` (6.18) accepts: UCODE_REV, ARCH_CAPABILITIES, POWER_CTL,
#: CR_PAT, MTRRcap, MTRRdefType, TSC_DEADLINE, MISC_ENABLE, PLATFORM_INFO, MISC_FEATURES_ENABLES,
#: APICBASE, EFER, FEAT_CTL, MCG_CAP, MCG_STATUS, MCG_CTL, MCG_EXT_CTL, MSR_KVM_POLL_CONTROL.
TDX_EMULATED_MSRS = frozenset((0x8B, 0x10A, 0x1FC, 0x277, 0xFE, 0x2FF, 0x6E0, 0x1A0, 0xCE, 0x140, 0x1B,
                               0xC0000080, 0x3A, 0x179, 0x17A, 0x17B, 0x4D0, 0x4B564D05))
#: Inclusive MSR ranges it accepts: MTRRphysBase0..MTRRfix4K_F8000, MC0_CTL..MCx_CTL(32)-1,
#: MC0_CTL2..MCx_CTL2(32)-1.
TDX_EMULATED_MSR_RANGES = ((0x200, 0x26F), (0x400, 0x400 + 4 * KVM_MAX_MCE_BANKS - 1),
                           (0x280, 0x280 + KVM_MAX_MCE_BANKS - 1))
#: x2APIC MSRs the CPU virtualizes for a TD, which KVM cannot emulate: TPR, PPR, EOI and the ISR,
#: TMR, IRR case ranges exactly as 6.18 spells them (``X2APIC_MSR(APIC_ISR) ...
#: X2APIC_MSR(APIC_ISR + APIC_ISR_NR)`` shifts the byte offset by 4, so each range is one MSR).
TDX_X2APIC_NOT_EMULATED = frozenset((0x808, 0x80A, 0x80B, 0x810, 0x818, 0x820))
#: ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX`` (sic, uapi): the entry's ``index`` (subleaf) must match.
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
#: Reset values of the MSRs a TD vCPU starts with (``tdx_vcpu_create``, 6.18): APIC base (x2APIC
#: mode, BSP bit for vCPU 0), EFER (SCE | LME | LMA | NX), PAT (``MSR_IA32_CR_PAT_DEFAULT``).
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
MSR_IA32_APICBASE_BSP = 1 << 8
LAPIC_MODE_X2APIC = (1 << 11) | (1 << 10)
TDX_EFER = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)
MSR_IA32_CR_PAT_DEFAULT = 0x0007040600070406
