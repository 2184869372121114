// Package vcsimtest runs an in-process vCenter simulator (govmomi's vcsim) holding one
// or more VMs whose disks are real flat files with generated content, plus what vcsim lacks:
// Changed Block Tracking (changeIds and QueryChangedDiskAreas) and a session check on
// the datastore file endpoint. Tests, e2e tests and the demo all use it.
package vcsimtest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/sim25"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// TB is the part of testing.TB the lab needs, so a non-test program can pass its own.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}

// Options shape the lab. Zero values take the defaults.
type Options struct {
	Disks    int   // number of disks of the VM; default 2
	DiskSize int64 // bytes per disk, a multiple of 1 KiB; default 64 MiB
	// DiskSizes, when set, sizes each VM's disks in order instead (Disks is then its length).
	DiskSizes []int64
	Seed      uint64
	VMName    string // default "df-vm01"
	// VMs is the number of VMs; default 1. The first is VMName, the others VMName-02,
	// VMName-03, ...; each has Disks disks of its own content.
	VMs int
	// CBT starts the VM with changeTrackingEnabled, so disks carry changeIds at once.
	CBT bool
	// NIC gives the VM a vmxnet3 adapter on "VM Network" (a restore recreates it).
	NIC bool
	// MaxExtentsPerQuery bounds each QueryChangedDiskAreas answer, as vCenter does,
	// so callers' continuation loops are exercised; default 8.
	MaxExtentsPerQuery int
}

// VM is one VM of the lab.
type VM struct {
	Name  string
	Moref string
	Path  string // inventory path
	Disks []Disk
}

// Disk is one disk of a lab VM.
type Disk struct {
	Key           int32
	Label         string
	CapacityBytes int64
	BackingFile   string // "[LocalDS_0] df-vm01/df-vm01.vmdk"
	FlatPath      string // the local -flat.vmdk holding the disk's bytes
}

// Lab is a running simulator. Everything exported is safe to read; the password is a
// throwaway generated per lab. VMName, VMMoref, VMPath and Disks describe the first VM,
// which the disk methods (WriteDisk, ReadDisk, ResetCBT, ...) act on.
type Lab struct {
	URL          string // https://127.0.0.1:port/sdk
	Thumbprint   string // SHA-1 of the simulator's certificate, "AB:CD:..."
	User         string
	Password     string
	Datacenter   string
	Datastore    string
	DatastoreDir string // local directory backing the datastore
	VMName       string
	VMMoref      string
	VMPath       string // inventory path
	Disks        []Disk
	VMs          []VM // every VM, the first one first

	model  *simulator.Model
	server *simulator.Server
	reg    *simulator.Registry
	admin  *vim25.Client
	vmRef  types.ManagedObjectReference
	batch  int
	seed   uint64

	mu    sync.Mutex
	disks map[int32]*diskState // the first VM's
	// vms holds each VM's disks, for CBT.
	vms map[types.ManagedObjectReference]map[int32]*diskState
}

// NewLab starts a lab and stops it when the test ends.
func NewLab(t TB, opts Options) *Lab {
	t.Helper()
	l, err := Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("start vcsim lab: %v", err)
	}
	t.Cleanup(l.Close)
	return l
}

// Start starts a lab; the caller must Close it.
func Start(ctx context.Context, opts Options) (*Lab, error) {
	if opts.Disks == 0 {
		opts.Disks = 2
	}
	if opts.DiskSize == 0 {
		opts.DiskSize = 64 << 20
	}
	if opts.Disks < 0 {
		return nil, fmt.Errorf("%d disks", opts.Disks)
	}
	if len(opts.DiskSizes) == 0 {
		opts.DiskSizes = slices.Repeat([]int64{opts.DiskSize}, opts.Disks)
	}
	opts.Disks = len(opts.DiskSizes)
	for _, size := range opts.DiskSizes {
		// vSphere sizes disks in KB (capacityInKB), so any KiB multiple is a real disk's size.
		if size%(1<<10) != 0 || size <= 0 {
			return nil, fmt.Errorf("disk size %d is not a positive multiple of 1 KiB", size)
		}
	}
	if opts.VMName == "" {
		opts.VMName = "df-vm01"
	}
	if opts.VMs <= 0 {
		opts.VMs = 1
	}
	if opts.MaxExtentsPerQuery <= 0 {
		opts.MaxExtentsPerQuery = 8
	}

	l := &Lab{
		User:     "diskferry-" + randomHex(4),
		Password: randomHex(16),
		VMName:   opts.VMName,
		batch:    opts.MaxExtentsPerQuery,
		seed:     opts.Seed,
		vms:      map[types.ManagedObjectReference]map[int32]*diskState{},
	}

	m := simulator.VPX()
	m.Cluster, m.ClusterHost, m.Machine, m.Portgroup = 0, 0, 0, 0
	if err := m.Create(); err != nil {
		return nil, fmt.Errorf("create vcsim model: %w", err)
	}
	l.model = m
	svc := m.Service
	svc.TLS = new(tls.Config)
	svc.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(l.User, l.Password)}
	svc.RegisterEndpoints = true
	// vcsim serves /folder to anyone; real vCenter wants the session cookie, so GET and
	// HEAD (the reads) and PUT (a restore's upload of a flat file) are checked here before
	// vcsim's own handler serves the file.
	svc.ServeMux = http.NewServeMux()
	svc.ServeMux.HandleFunc("GET /folder/", l.serveFolder)
	svc.ServeMux.HandleFunc("PUT /folder/", l.serveFolder)
	l.reg = m.Map()
	l.reg.Handler = l.intercept

	l.server = svc.NewServer()
	u := *l.server.URL
	u.User = nil
	l.URL = u.String()
	l.Thumbprint = soap.ThumbprintSHA1(l.server.Certificate())

	if err := l.build(ctx, opts); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Close stops the simulator and removes its datastore files.
func (l *Lab) Close() {
	if l.admin != nil {
		_ = session.NewManager(l.admin).Logout(context.Background())
	}
	// Requests still in flight (a reader's last range) check sessions with l.admin: it is
	// dropped only once the server has waited for them.
	if l.server != nil {
		l.server.Close()
		l.server = nil
	}
	l.admin = nil
	l.mu.Lock()
	for _, disks := range l.vms {
		for _, st := range disks {
			_ = st.file.Close()
		}
	}
	l.mu.Unlock()
	if l.model != nil {
		l.model.Remove()
		l.model = nil
	}
}

// build logs in as the lab's admin and creates the VMs, their disks and their content.
func (l *Lab) build(ctx context.Context, opts Options) error {
	u, err := soap.ParseURL(l.URL)
	if err != nil {
		return fmt.Errorf("lab URL: %w", err)
	}
	sc := soap.NewClient(u, false)
	// Trust the simulator's own certificate: a thumbprint alone makes govmomi try the
	// system CAs first, and the failed handshake ends up in the simulator's log.
	caFile, err := l.server.CertificateFile()
	if err != nil {
		return fmt.Errorf("lab certificate: %w", err)
	}
	if err := sc.SetRootCAs(caFile); err != nil {
		return fmt.Errorf("lab certificate: %w", err)
	}
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return fmt.Errorf("lab admin client: %w", err)
	}
	if err := session.NewManager(vc).Login(ctx, url.UserPassword(l.User, l.Password)); err != nil {
		return fmt.Errorf("lab admin login: %w", err)
	}
	l.admin = vc

	finder := find.NewFinder(vc, false)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return fmt.Errorf("lab datacenter: %w", err)
	}
	finder.SetDatacenter(dc)
	ds, err := finder.DefaultDatastore(ctx)
	if err != nil {
		return fmt.Errorf("lab datastore: %w", err)
	}
	host, err := finder.DefaultHostSystem(ctx)
	if err != nil {
		return fmt.Errorf("lab host: %w", err)
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return fmt.Errorf("lab resource pool: %w", err)
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return fmt.Errorf("lab folders: %w", err)
	}
	var dso mo.Datastore
	if err := ds.Properties(ctx, ds.Reference(), []string{"name", "summary"}, &dso); err != nil {
		return fmt.Errorf("lab datastore properties: %w", err)
	}
	l.Datacenter = dc.Name()
	l.Datastore = dso.Name
	l.DatastoreDir = dso.Summary.Url

	var nicBacking types.BaseVirtualDeviceBackingInfo
	if opts.NIC {
		network, err := finder.Network(ctx, "VM Network")
		if err != nil {
			return fmt.Errorf("lab network: %w", err)
		}
		if nicBacking, err = network.EthernetCardBackingInfo(ctx); err != nil {
			return fmt.Errorf("lab network backing: %w", err)
		}
	}
	for v := range opts.VMs {
		name := opts.VMName
		if v > 0 {
			name = fmt.Sprintf("%s-%02d", opts.VMName, v+1)
		}
		vm, err := l.createVM(ctx, name, folders.VmFolder, pool, host, ds.Reference(), nicBacking, opts)
		if err != nil {
			return err
		}
		// Each VM's disks get content and CBT ids of their own: index v*Disks+i of the seed.
		info, disks, err := l.vmDisks(ctx, vm, v*opts.Disks)
		if err != nil {
			return err
		}
		if len(info.Disks) != opts.Disks {
			return fmt.Errorf("lab VM %s has %d disks, want %d", name, len(info.Disks), opts.Disks)
		}
		info.Name, info.Moref, info.Path = name, vm.Reference().Value, path.Join(dc.InventoryPath, "vm", name)
		l.VMs = append(l.VMs, info)
		l.vms[vm.Reference()] = disks
		if v == 0 {
			l.vmRef = vm.Reference()
			l.VMMoref, l.VMPath, l.Disks, l.disks = info.Moref, info.Path, info.Disks, disks
		}
	}
	l.syncChangeIDs(&simulator.Context{Context: ctx, Map: l.reg})
	return nil
}

// vmDisks reads a new VM's disks and creates their content, seeded from index first on.
func (l *Lab) vmDisks(ctx context.Context, vm *object.VirtualMachine, first int) (VM, map[int32]*diskState, error) {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"config.hardware.device"}, &o); err != nil {
		return VM{}, nil, fmt.Errorf("lab VM devices: %w", err)
	}
	var info VM
	states := map[int32]*diskState{}
	devices := object.VirtualDeviceList(o.Config.Hardware.Device)
	for i, d := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		vd := d.(*types.VirtualDisk)
		b := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		var p object.DatastorePath
		if !p.FromString(b.FileName) {
			return VM{}, nil, fmt.Errorf("lab disk %d: backing %q", vd.Key, b.FileName)
		}
		disk := Disk{
			Key:           vd.Key,
			Label:         devices.Name(vd),
			CapacityBytes: vd.CapacityInBytes,
			BackingFile:   b.FileName,
			FlatPath:      filepath.Join(l.DatastoreDir, filepath.FromSlash(strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk")),
		}
		if vd.DeviceInfo != nil {
			disk.Label = vd.DeviceInfo.GetDescription().Label
		}
		st, err := newDiskState(disk, l.seed, first+i)
		if err != nil {
			return VM{}, nil, err
		}
		info.Disks = append(info.Disks, disk)
		states[disk.Key] = st
	}
	return info, states, nil
}

func (l *Lab) createVM(ctx context.Context, name string, folder *object.Folder, pool *object.ResourcePool, host *object.HostSystem,
	ds types.ManagedObjectReference, nicBacking types.BaseVirtualDeviceBackingInfo, opts Options) (*object.VirtualMachine, error) {
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return nil, fmt.Errorf("lab SCSI controller: %w", err)
	}
	devices = append(devices, scsi)
	ctrl := scsi.(types.BaseVirtualController)
	changes := []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationAdd,
		Device:    scsi,
	}}
	for i := range opts.Disks {
		file := fmt.Sprintf("[%s] %s/%s.vmdk", l.Datastore, name, name)
		if i > 0 {
			file = fmt.Sprintf("[%s] %s/%s_%d.vmdk", l.Datastore, name, name, i)
		}
		disk := devices.CreateDisk(ctrl, ds, file)
		disk.CapacityInBytes = opts.DiskSizes[i]
		disk.CapacityInKB = opts.DiskSizes[i] / 1024
		devices = append(devices, disk)
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
	}
	if nicBacking != nil {
		nic, err := devices.CreateEthernetCard("vmxnet3", nicBacking)
		if err != nil {
			return nil, fmt.Errorf("lab NIC: %w", err)
		}
		changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: nic})
	}
	cbt := opts.CBT
	spec := types.VirtualMachineConfigSpec{
		Name:                  name,
		GuestId:               string(types.VirtualMachineGuestOsIdentifierOtherLinux64Guest),
		NumCPUs:               1,
		MemoryMB:              256,
		ChangeTrackingEnabled: &cbt,
		Files:                 &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", l.Datastore)},
		DeviceChange:          changes,
	}
	task, err := folder.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return nil, fmt.Errorf("lab create VM: %w", err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		return nil, fmt.Errorf("lab create VM: %w", err)
	}
	vm := object.NewVirtualMachine(l.admin, res.Result.(types.ManagedObjectReference))
	power, err := vm.PowerOn(ctx)
	if err != nil {
		return nil, fmt.Errorf("lab power on VM: %w", err)
	}
	if err := power.Wait(ctx); err != nil {
		return nil, fmt.Errorf("lab power on VM: %w", err)
	}
	return vm, nil
}

// serveFolder serves the datastore's files the way vCenter's /folder endpoint does (GET
// and HEAD with HTTP Range, PUT to upload) but, as vCenter, only with a live session cookie.
// It serves the files itself: vcsim's own handler copies the whole datastore object without
// its lock on every request (racing with vcsim's locked writes to it, e.g. free space as
// disks come and go) and runs inventory queries per request.
func (l *Lab) serveFolder(w http.ResponseWriter, r *http.Request) {
	c, err := r.Cookie(soap.SessionCookieName)
	if err != nil || !l.sessionActive(r.Context(), c.Value) {
		http.Error(w, "session cookie missing or not valid", http.StatusUnauthorized)
		return
	}
	if ds := r.URL.Query().Get("dsName"); ds != "" && ds != l.Datastore {
		http.Error(w, "no datastore "+ds, http.StatusNotFound)
		return
	}
	rel := filepath.FromSlash(strings.TrimPrefix(r.URL.Path, "/folder/"))
	if !filepath.IsLocal(rel) {
		http.Error(w, "path outside the datastore", http.StatusBadRequest)
		return
	}
	p := filepath.Join(l.DatastoreDir, rel)
	if r.Method != http.MethodPut {
		http.ServeFile(w, r, p)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	f, err := os.Create(p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	_, err = io.Copy(f, r.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}
}

func (l *Lab) sessionActive(ctx context.Context, key string) bool {
	var sm mo.SessionManager
	if err := property.DefaultCollector(l.admin).RetrieveOne(ctx, *l.admin.ServiceContent.SessionManager, []string{"sessionList"}, &sm); err != nil {
		return false
	}
	for _, s := range sm.SessionList {
		if s.Key == key {
			return true
		}
	}
	return false
}

// SetSessionTimeout makes sessions created from now on expire after d of idleness,
// so keepalive and re-login paths can be tested.
func (l *Lab) SetSessionTimeout(ctx context.Context, d time.Duration) error {
	if err := sim25.SetSessionTimeout(ctx, l.admin, d); err != nil {
		return fmt.Errorf("set vcsim session timeout: %w", err)
	}
	return nil
}

// FailNext makes the next call of a SOAP method (e.g. "CreateSnapshot_Task",
// "QueryChangedDiskAreas") fail with fault; nil means a generic SystemError.
func (l *Lab) FailNext(method string, fault types.BaseMethodFault) {
	rule := &simulator.FaultInjectionRule{
		MethodName:  method,
		ObjectType:  "*",
		ObjectName:  "*",
		Probability: 1,
		FaultType:   simulator.FaultTypeGeneric,
		Message:     "injected by vcsimtest",
		MaxCount:    1,
		Enabled:     true,
	}
	if fault != nil {
		rule.FaultType = simulator.FaultTypeCustom
		rule.Fault = fault
	}
	l.model.Service.AddFaultRule(rule)
}

// HoldTask shows a running task of the given method name (e.g. "CreateSnapshot_Task")
// on the VM, as if another tool were snapshotting it, until release is called.
func (l *Lab) HoldTask(method string) (release func()) {
	name := strings.TrimSuffix(method, "_Task")
	task := &simulator.Task{}
	task.Info = types.TaskInfo{
		Name:          method,
		DescriptionId: "VirtualMachine." + strings.ToLower(name[:1]) + name[1:],
		Entity:        &l.vmRef,
		EntityName:    l.VMName,
		State:         types.TaskInfoStateRunning,
	}
	l.reg.Put(task)
	lockCtx := &simulator.Context{Context: context.Background(), Map: l.reg}
	l.reg.WithLock(lockCtx, task, func() {
		task.Info.Key = task.Self.Value
		task.Info.Task = task.Self
	})
	var once sync.Once
	return func() {
		once.Do(func() {
			l.reg.WithLock(lockCtx, task, func() {
				l.reg.Update(lockCtx, task, []types.PropertyChange{{Name: "info.state", Val: types.TaskInfoStateSuccess}})
			})
		})
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return hex.EncodeToString(b)
}

// Disk returns the lab disk with the given key.
func (l *Lab) Disk(key int32) (Disk, error) {
	for _, d := range l.Disks {
		if d.Key == key {
			return d, nil
		}
	}
	return Disk{}, fmt.Errorf("lab has no disk %d", key)
}

// ensureFlat creates the flat file at full (sparse) size: nbdkit and HTTP readers
// learn the disk size from it.
func ensureFlat(d Disk) (*os.File, error) {
	f, err := os.OpenFile(d.FlatPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open flat file of disk %d: %w", d.Key, err)
	}
	if err := f.Truncate(d.CapacityBytes); err != nil {
		f.Close()
		return nil, fmt.Errorf("size flat file of disk %d: %w", d.Key, err)
	}
	return f, nil
}

// FlatPath is the local file holding the bytes of a disk whose backing file is
// "[datastore] dir/name.vmdk" (its -flat.vmdk), for any VM of the lab's datastore.
func (l *Lab) FlatPath(backingFile string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(backingFile) || p.Datastore != l.Datastore || !strings.HasSuffix(p.Path, ".vmdk") {
		return "", fmt.Errorf("backing file %q is not a disk on datastore %s", backingFile, l.Datastore)
	}
	return filepath.Join(l.DatastoreDir, filepath.FromSlash(strings.TrimSuffix(p.Path, ".vmdk")+"-flat.vmdk")), nil
}
