package vcsimtest

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/diskferry/diskferry/internal/vsphere"
)

// diskState is the CBT emulation of one disk: every write made through the lab is
// logged, and changeId "<uuid>/<n>" names the disk after its first n logged writes.
type diskState struct {
	disk       Disk
	file       *os.File
	uuid       string
	generation uint64
	writes     []vsphere.Extent
	allocated  []vsphere.Extent // sorted, merged: generated content plus writes
}

// newDiskState creates the flat file and fills it with content derived from seed:
// random data in about a quarter of its chunks, holes elsewhere.
func newDiskState(d Disk, seed uint64, index int) (*diskState, error) {
	f, err := ensureFlat(d)
	if err != nil {
		return nil, err
	}
	st := &diskState{disk: d, file: f}
	st.uuid = cbtUUID(seed, uint64(index), 0)

	rng := rand.New(rand.NewChaCha8(seedBytes(seed, uint64(index))))
	chunk := min(max(d.CapacityBytes/64, 64<<10), 1<<20) &^ (64<<10 - 1)
	buf := make([]byte, chunk)
	for off := int64(0); off < d.CapacityBytes; off += chunk {
		// The first chunk always holds data, so no disk is entirely a hole.
		if off != 0 && rng.IntN(4) != 0 {
			continue
		}
		n := min(chunk, d.CapacityBytes-off)
		for i := range buf[:n] {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			f.Close()
			return nil, fmt.Errorf("fill disk %d: %w", d.Key, err)
		}
		st.allocated = mergeInto(st.allocated, vsphere.Extent{Start: off, Length: n})
	}
	return st, nil
}

func seedBytes(seed, index uint64) [32]byte {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[0:], seed)
	binary.LittleEndian.PutUint64(b[8:], index)
	copy(b[16:], "diskferry-vcsim")
	return b
}

// cbtUUID formats a deterministic UUID the way VMware prints CBT ids:
// "52 6b 3e 0a 9c 1f 4d 22-8e 07 5a 33 c1 9d 0e 7f".
func cbtUUID(seed, index, generation uint64) string {
	rng := rand.New(rand.NewPCG(seed^0x9e3779b97f4a7c15, index<<32|generation))
	parts := make([]string, 16)
	for i := range parts {
		parts[i] = fmt.Sprintf("%02x", byte(rng.Uint32()))
	}
	parts[0] = "52"
	return strings.Join(parts[:8], " ") + "-" + strings.Join(parts[8:], " ")
}

// mergeInto inserts e into sorted, merged extents.
func mergeInto(list []vsphere.Extent, e vsphere.Extent) []vsphere.Extent {
	if e.Length <= 0 {
		return list
	}
	out := make([]vsphere.Extent, 0, len(list)+1)
	placed := false
	for _, x := range list {
		switch {
		case x.End() < e.Start:
			out = append(out, x)
		case e.End() < x.Start:
			if !placed {
				out = append(out, e)
				placed = true
			}
			out = append(out, x)
		default:
			start := min(x.Start, e.Start)
			e = vsphere.Extent{Start: start, Length: max(x.End(), e.End()) - start}
		}
	}
	if !placed {
		out = append(out, e)
	}
	return out
}

func (st *diskState) changeID() string {
	return st.uuid + "/" + strconv.Itoa(len(st.writes))
}

// WriteDisk writes data into a disk's flat file at offset and logs the write for CBT.
func (l *Lab) WriteDisk(key int32, offset int64, data []byte) error {
	l.mu.Lock()
	st, ok := l.disks[key]
	if !ok {
		l.mu.Unlock()
		return fmt.Errorf("write disk %d: no such disk", key)
	}
	if offset < 0 || offset+int64(len(data)) > st.disk.CapacityBytes {
		l.mu.Unlock()
		return fmt.Errorf("write disk %d: [%d,+%d) outside capacity %d", key, offset, len(data), st.disk.CapacityBytes)
	}
	if _, err := st.file.WriteAt(data, offset); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("write disk %d at %d: %w", key, offset, err)
	}
	e := vsphere.Extent{Start: offset, Length: int64(len(data))}
	st.writes = append(st.writes, e)
	st.allocated = mergeInto(st.allocated, e)
	l.mu.Unlock()

	l.syncChangeIDs(&simulator.Context{Map: l.reg})
	return nil
}

// WriteRandom writes length random bytes at offset (see WriteDisk) and returns them.
func (l *Lab) WriteRandom(key int32, offset, length int64) ([]byte, error) {
	data := make([]byte, length)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	return data, l.WriteDisk(key, offset, data)
}

// ReadDisk reads length bytes of a disk's current content.
func (l *Lab) ReadDisk(key int32, offset, length int64) ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.disks[key]
	if !ok {
		return nil, fmt.Errorf("read disk %d: no such disk", key)
	}
	buf := make([]byte, length)
	if _, err := st.file.ReadAt(buf, offset); err != nil {
		return nil, fmt.Errorf("read disk %d at %d: %w", key, offset, err)
	}
	return buf, nil
}

// Allocated is what QueryChangedDiskAreas answers for changeId "*": every area holding
// generated content or written through the lab.
func (l *Lab) Allocated(key int32) []vsphere.Extent {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st, ok := l.disks[key]; ok {
		return slices.Clone(st.allocated)
	}
	return nil
}

// ChangeID is the disk's current changeId (what a snapshot taken now records), or ""
// while CBT is off on the VM.
func (l *Lab) ChangeID(key int32) string {
	vm := l.reg.Get(l.vmRef).(*simulator.VirtualMachine)
	var id string
	l.reg.WithLock(&simulator.Context{Map: l.reg}, vm, func() {
		if d, ok := diskDevice(vm.Config.Hardware.Device, key); ok {
			id = d.Backing.(*types.VirtualDiskFlatVer2BackingInfo).ChangeId
		}
	})
	return id
}

// ResetCBT gives a disk a new CBT identity, as vSphere does when CBT is reset or the
// disk is resized: every older changeId of that disk is refused from now on.
func (l *Lab) ResetCBT(key int32) error {
	l.mu.Lock()
	st, ok := l.disks[key]
	if !ok {
		l.mu.Unlock()
		return fmt.Errorf("reset CBT of disk %d: no such disk", key)
	}
	st.generation++
	idx := slices.IndexFunc(l.Disks, func(d Disk) bool { return d.Key == key })
	st.uuid = cbtUUID(l.seed, uint64(idx), st.generation)
	st.writes = nil
	l.mu.Unlock()
	l.syncChangeIDs(&simulator.Context{Map: l.reg})
	return nil
}

// syncChangeIDs writes each disk's changeId into the simulator VMs' disk backings
// (empty while CBT is off), so snapshots copy them into their config.
func (l *Lab) syncChangeIDs(ctx *simulator.Context) {
	for ref, disks := range l.vms {
		l.syncVMChangeIDs(ctx, ref, disks)
	}
}

func (l *Lab) syncVMChangeIDs(ctx *simulator.Context, ref types.ManagedObjectReference, disks map[int32]*diskState) {
	vm, ok := l.reg.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	l.reg.WithLock(ctx, vm, func() {
		on := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		l.mu.Lock()
		defer l.mu.Unlock()
		for key, st := range disks {
			d, ok := diskDevice(vm.Config.Hardware.Device, key)
			if !ok {
				continue
			}
			b := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if on {
				b.ChangeId = st.changeID()
			} else {
				b.ChangeId = ""
			}
		}
	})
}

func diskDevice(devices []types.BaseVirtualDevice, key int32) (*types.VirtualDisk, bool) {
	for _, d := range devices {
		if vd, ok := d.(*types.VirtualDisk); ok && vd.Key == key {
			return vd, true
		}
	}
	return nil, false
}

// intercept is the simulator's Registry.Handler, called before every SOAP method.
// vcsim has no QueryChangedDiskAreas, so the calling session is given a wrapper of the
// VM that has one. It must be a per-session object (Session.Put): replacing the VM in
// the global registry breaks vcsim's own type assertions (CreateSnapshot panics).
func (l *Lab) intercept(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
	disks, ok := l.vms[m.This]
	if !ok {
		return nil, nil
	}
	switch m.Name {
	case "QueryChangedDiskAreas":
		if ctx.Session == nil || ctx.Session.Registry.Get(m.This) != nil {
			return nil, nil
		}
		vm := l.reg.Get(m.This).(*simulator.VirtualMachine)
		ctx.WithLock(vm, func() { ctx.Session.Put(&cbtVM{VirtualMachine: vm, lab: l, disks: disks}) })
	case "CreateSnapshot_Task", "CreateSnapshotEx_Task":
		// CBT may have been switched on or off since the last write.
		l.syncVMChangeIDs(ctx, m.This, disks)
	}
	return nil, nil
}

// cbtVM is the simulator VM plus QueryChangedDiskAreas; every other method is the VM's.
type cbtVM struct {
	*simulator.VirtualMachine
	// Self shadows the VM's: Session.Put sets the Self field it finds by name, and it must
	// not write the shared VM's, which vcsim reads unlocked to find an object's lock (a
	// data race the race detector caught under concurrent backups).
	Self  types.ManagedObjectReference
	lab   *Lab
	disks map[int32]*diskState
}

// QueryChangedDiskAreas answers like vCenter: the areas changed since req.ChangeId up to
// the snapshot's changeId (all allocated areas for "*"), from req.StartOffset, at most
// MaxExtentsPerQuery of them; the answer's range ends where the caller continues.
func (v *cbtVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, fault := v.lab.changedAreas(ctx, v.VirtualMachine, v.disks, req)
	if fault != nil {
		body.Fault_ = simulator.Fault("", fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: info}
	return body
}

func (l *Lab) changedAreas(ctx *simulator.Context, vm *simulator.VirtualMachine, disks map[int32]*diskState, req *types.QueryChangedDiskAreas) (types.DiskChangeInfo, types.BaseMethodFault) {
	devices := vm.Config.Hardware.Device
	if req.Snapshot != nil {
		snap, ok := ctx.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return types.DiskChangeInfo{}, &types.ManagedObjectNotFound{Obj: *req.Snapshot}
		}
		if snap.Vm != vm.Self {
			return types.DiskChangeInfo{}, &types.InvalidArgument{InvalidProperty: "snapshot"}
		}
		devices = snap.Config.Hardware.Device
	}
	d, ok := diskDevice(devices, req.DeviceKey)
	if !ok {
		return types.DiskChangeInfo{}, &types.InvalidArgument{InvalidProperty: "deviceKey"}
	}
	backing := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)

	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := disks[req.DeviceKey]
	if !ok {
		return types.DiskChangeInfo{}, &types.InvalidArgument{InvalidProperty: "deviceKey"}
	}
	capacity := st.disk.CapacityBytes
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return types.DiskChangeInfo{}, &types.InvalidArgument{InvalidProperty: "startOffset"}
	}
	// The snapshot's own changeId fixes which writes it contains.
	upto, ok := parseChangeID(backing.ChangeId, st.uuid)
	if !ok || upto > len(st.writes) {
		return types.DiskChangeInfo{}, &types.FileFault{File: backing.FileName}
	}
	var areas []vsphere.Extent
	if req.ChangeId == "*" {
		areas = st.allocated
	} else {
		since, ok := parseChangeID(req.ChangeId, st.uuid)
		if !ok || since > upto {
			return types.DiskChangeInfo{}, &types.InvalidArgument{InvalidProperty: "changeId"}
		}
		for _, w := range st.writes[since:upto] {
			areas = mergeInto(areas, w)
		}
	}

	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: capacity - req.StartOffset}
	for _, a := range areas {
		if a.End() <= req.StartOffset {
			continue
		}
		if a.Start < req.StartOffset {
			a = vsphere.Extent{Start: req.StartOffset, Length: a.End() - req.StartOffset}
		}
		if len(info.ChangedArea) == l.batch {
			last := info.ChangedArea[len(info.ChangedArea)-1]
			info.Length = last.Start + last.Length - req.StartOffset
			break
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.Start, Length: a.Length})
	}
	return info, nil
}

// parseChangeID returns n of "<uuid>/<n>" when the uuid is the disk's current one.
func parseChangeID(id, uuid string) (int, bool) {
	u, seq, ok := strings.Cut(id, "/")
	if !ok || u != uuid {
		return 0, false
	}
	n, err := strconv.Atoi(seq)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}
