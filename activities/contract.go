// Package activities holds the contract between BackupWorkflow and the workers: the task
// queue names, the registered activity names and their plain-JSON inputs and results.
// The hub and sna subpackages implement them; workflows import only this package.
//
// Nothing here may carry a secret: every value ends up in workflow history and the Web UI.
package activities

import (
	"time"

	"github.com/diskferry/diskferry/internal/vmshape"
)

// Task queues (docs/architecture.md, Control plane).
const (
	// HubQueue runs the workflows and host-agnostic hub activities (catalog, ports).
	HubQueue = "diskferry-hub"
)

// HubHostQueue is the queue of activities bound to one hub host (files, qemu-nbd).
func HubHostQueue(hubID string) string { return HubQueue + "." + hubID }

// SNAQueue is the queue of activities that must run on one source site's SNA.
func SNAQueue(site string) string { return "diskferry-sna." + site }

// Activity names, registered explicitly so histories and the temporal CLI read clearly.
// Each comment gives the activity's input → result.
const (
	// hub, on HubQueue
	PlanBackupName    = "PlanBackup"    // PlanBackupInput → Plan
	AllocatePortName  = "AllocatePort"  // AllocatePortInput → int (the port); runs before the port-wait change
	AllocatePortsName = "AllocatePorts" // AllocatePortsInput → []int (the ports, in DiskKeys' order)
	ReleasePortsName  = "ReleasePorts"  // ReleasePortsInput → nothing
	CommitPointName   = "CommitPoint"   // CommitPointInput → nothing
	FailPointName     = "FailPoint"     // FailPointInput → nothing

	// hub host, on HubHostQueue(hubID)
	PrepareTargetName = "PrepareTarget" // PrepareTargetInput → Target
	DiscardTargetName = "DiscardTarget" // DiscardTargetInput → nothing
	StartExportName   = "StartExport"   // StartExportInput → Export
	StopExportName    = "StopExport"    // StopExportInput → nothing
	VerifyTargetName  = "VerifyTarget"  // VerifyTargetInput → Verification

	// sna, on SNAQueue(site)
	InspectVMName      = "InspectVM"      // InspectVMInput → VM
	EnsureTunnelName   = "EnsureTunnel"   // EnsureTunnelInput → Forwards (a backup ignores it)
	DropTunnelName     = "DropTunnel"     // EnsureTunnelInput → nothing
	CreateSnapshotName = "CreateSnapshot" // CreateSnapshotInput → Snapshot
	RemoveSnapshotName = "RemoveSnapshot" // Snapshot → nothing
	CopyDiskName       = "CopyDisk"       // CopyDiskInput → CopyDiskResult; heartbeats CopyProgress
	ReadChangeIDsName  = "ReadChangeIDs"  // ReadChangeIDsInput → map[int32]string (disk key → changeId)
)

// Error types for temporal.NewNonRetryableApplicationError; the workflow does not retry them.
const (
	ErrBadInput       = "BadInput"       // the request names something invalid
	ErrNotFound       = "NotFound"       // the VM, disk or point does not exist
	ErrPortsExhausted = "PortsExhausted" // no free port on the hub; retryable with backoff
	ErrBackupRunning  = "BackupRunning"  // another backup of the same VM is running
	ErrNoSpace        = "NoSpace"        // a disk (the hub's repository) is full
	ErrRefused        = "Refused"        // vCenter refused the request (invalid argument, not supported, no permission)
	ErrNoWorker       = "NoWorker"       // no worker took the step from its task queue in time
	ErrNoHub          = "NoHub"          // no hub is alive to take a new chain; retryable for the step's bound
	// ErrChangeIDRefused is CopyDisk's answer when vCenter refuses the previous changeId of
	// an incremental copy: the workflow copies that disk in full instead.
	ErrChangeIDRefused = "ChangeIDRefused"
)

// Backup modes.
const (
	ModeAuto        = "auto"
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// Disk describes one virtual disk of a VM as seen on the SNA.
type Disk struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	CapacityBytes int64  `json:"capacityBytes"`
	BackingFile   string `json:"backingFile"` // "[datastore] dir/name.vmdk"
	Datastore     string `json:"datastore"`
	ChangeID      string `json:"changeId,omitempty"` // of the live disk; empty without CBT
}

// VM is what InspectVM returns.
type VM struct {
	InstanceUUID string `json:"instanceUuid"` // vCenter instance UUID, identifies the vCenter
	Moref        string `json:"moref"`
	Name         string `json:"name"`
	PowerState   string `json:"powerState"`
	CBTEnabled   bool   `json:"cbtEnabled"`
	Disks        []Disk `json:"disks"`
	// Config is the VM's shape, kept with the restore point for a restore into a new VM;
	// nil in histories from before it was captured.
	Config *VMConfig `json:"config,omitempty"`
}

// VMConfig, DiskLayout and NIC are the VM's shape a restore into a new VM recreates
// (package vmshape: one type from vSphere to the catalog).
type (
	VMConfig   = vmshape.Config
	DiskLayout = vmshape.DiskLayout
	NIC        = vmshape.NIC
)

// InspectVMInput names a VM by inventory path, name or moref.
type InspectVMInput struct {
	VM string `json:"vm"`
}

// PlanBackupInput asks the hub to decide full or incremental per disk and to open a
// restore point in status running.
type PlanBackupInput struct {
	WorkflowID string  `json:"workflowId"`
	RunID      string  `json:"runId"`
	Site       string  `json:"site"`
	VM         VM      `json:"vm"`
	Mode       string  `json:"mode"`            // auto|full|incremental
	DiskKeys   []int32 `json:"disks,omitempty"` // empty: every disk
}

// DiskPlan is the hub's decision for one disk.
type DiskPlan struct {
	Key           int32  `json:"key"`
	CapacityBytes int64  `json:"capacityBytes"`
	Mode          string `json:"mode"`                   // full|incremental
	Reason        string `json:"reason,omitempty"`       // why full when incremental was possible/asked
	ParentPath    string `json:"parentPath,omitempty"`   // previous point's qcow2 (incremental)
	PrevChangeID  string `json:"prevChangeId,omitempty"` // changeId of the previous point (incremental)
}

// Plan is the result of PlanBackup.
type Plan struct {
	PointID string     `json:"pointId"`
	HubID   string     `json:"hubId"`
	Mode    string     `json:"mode"` // full if any disk is copied in full, else incremental
	Disks   []DiskPlan `json:"disks"`
	// Note is for the job log: why the backup may wait for its hub (the VM's chain lives on
	// a hub whose worker was not seen lately).
	Note string `json:"note,omitempty"`
}

// PortsExhausted are the details of ErrPortsExhausted: the hub without enough free ports,
// its range, how many ports the caller needed, how many were free and how many jobs are
// ahead of it in the hub's line for ports (first come, first served).
type PortsExhausted struct {
	HubID  string `json:"hubId"`
	Ports  int    `json:"ports"`
	First  int    `json:"first"`
	Last   int    `json:"last"`
	Needed int    `json:"needed,omitempty"`
	Free   int    `json:"free,omitempty"`
	Ahead  int    `json:"ahead,omitempty"`
}

// PortsFreeSignal is the signal a hub sends a run waiting in its line for ports when a
// release made room for it, so the run asks again at once instead of at its next timer.
// It has no payload.
const PortsFreeSignal = "ports-free"

// AllocatePortInput leases a port on a hub to (workflow, disk); idempotent per pair.
type AllocatePortInput struct {
	HubID      string `json:"hubId"`
	WorkflowID string `json:"workflowId"`
	DiskKey    int32  `json:"diskKey"`
}

// AllocatePortsInput leases a port on a hub to each (workflow, disk) pair, all or none;
// idempotent per pair.
type AllocatePortsInput struct {
	HubID      string  `json:"hubId"`
	WorkflowID string  `json:"workflowId"`
	DiskKeys   []int32 `json:"diskKeys"`
}

// ReleasePortsInput frees every lease a workflow holds; idempotent.
type ReleasePortsInput struct {
	HubID      string `json:"hubId"`
	WorkflowID string `json:"workflowId"`
}

// PrepareTargetInput creates the qcow2 for one disk of a point (overlay when ParentPath set).
type PrepareTargetInput struct {
	PointID string   `json:"pointId"`
	VM      VM       `json:"vm"`
	Disk    DiskPlan `json:"disk"`
}

// Target is a prepared qcow2 on the hub.
type Target struct {
	DiskKey int32  `json:"diskKey"`
	Path    string `json:"path"`
}

// DiscardTargetInput deletes an unfinished target file; idempotent. The target is named by
// its point and disk, so the undo can be registered before PrepareTarget runs: a prepare that
// created the file and then failed or lost its reply leaves nothing behind either.
type DiscardTargetInput struct {
	PointID string `json:"pointId"`
	VMName  string `json:"vmName"`
	VMMoref string `json:"vmMoref"`
	DiskKey int32  `json:"diskKey"`
}

// StartExportInput serves a target with qemu-nbd on the unix socket of the leased Port.
type StartExportInput struct {
	WorkflowID  string `json:"workflowId"`
	DiskKey     int32  `json:"diskKey"`
	Path        string `json:"path"`
	Port        int    `json:"port"`
	Connections int    `json:"connections"` // copy connections; --shared is larger
	// ReadOnly serves a complete point for a restore or mount (qemu-nbd --read-only on its
	// backing chain); reconcile restarts it read-only too.
	ReadOnly bool `json:"readOnly,omitempty"`
}

// Export is a running qemu-nbd export.
type Export struct {
	DiskKey int32  `json:"diskKey"`
	Port    int    `json:"port"` // the port lease: the export's identity, no TCP listener
	Name    string `json:"name"` // NBD export name
	PID     int    `json:"pid"`
	Path    string `json:"path"`
	// Socket is the unix socket qemu-nbd serves on, on the hub; the SNA reaches it through
	// the SSH connection (stream-local forwarding).
	Socket string `json:"socket,omitempty"`
}

// StopExportInput flushes and stops an export; "already gone" counts as stopped.
type StopExportInput struct {
	Port int    `json:"port"`
	Path string `json:"path"`
}

// Extent is a byte range of a disk.
type Extent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
}

// VerifyTargetInput checks a finished target: qemu-img check, the target's own clusters
// against the areas (nothing written outside them), then the copy's digest is recomputed
// from the file's logical content over the same areas.
type VerifyTargetInput struct {
	Path      string   `json:"path"`
	BlockSize int64    `json:"blockSize"`
	Digest    string   `json:"digest"` // from CopyDiskResult
	Areas     []Extent `json:"areas"`  // nil (null): the whole disk; empty: nothing
}

// Verification is the result of VerifyTarget.
type Verification struct {
	Path           string `json:"path"`
	AllocatedBytes int64  `json:"allocatedBytes"`
	VirtualBytes   int64  `json:"virtualBytes"`
	// Manifest is the block manifest kept beside the target (diskferry verify checks the
	// point against it later); it covers the copied areas.
	Manifest string `json:"manifest,omitempty"`
}

// EnsureTunnelInput makes the export of each port reachable on the SNA, on a private unix
// socket forwarded to the export's socket on the hub.
type EnsureTunnelInput struct {
	HubID string `json:"hubId"`
	Ports []int  `json:"ports"`
	// Sockets are the exports' sockets on the hub (Export.Socket), by port; DropTunnel
	// does not need them.
	Sockets map[int]string `json:"sockets,omitempty"`
}

// Forwards are the unix sockets on the SNA that reach the exports, by port (what a mount
// with a site prints).
type Forwards struct {
	Sockets map[int]string `json:"sockets"`
}

// CreateSnapshotInput creates a snapshot (memory false) named for the workflow.
type CreateSnapshotInput struct {
	VMMoref string `json:"vmMoref"`
	Name    string `json:"name"`
	Quiesce bool   `json:"quiesce"`
}

// Snapshot identifies a snapshot.
type Snapshot struct {
	VMMoref string `json:"vmMoref"`
	Moref   string `json:"moref"`
	Name    string `json:"name"`
}

// CopyDiskInput copies one disk of a snapshot into a hub export through the tunnel.
type CopyDiskInput struct {
	Snapshot      Snapshot `json:"snapshot"`
	DiskKey       int32    `json:"diskKey"`
	CapacityBytes int64    `json:"capacityBytes"`
	TargetPort    int      `json:"targetPort"` // the export's port lease, naming its forward on the SNA
	// HubID is the hub TargetPort is forwarded to: an attempt retried on a restarted SNA
	// opens the forward again, to TargetSocket.
	HubID        string `json:"hubId,omitempty"`
	TargetSocket string `json:"targetSocket,omitempty"` // Export.Socket, on the hub
	ExportName   string `json:"exportName"`
	Mode         string `json:"mode"`                   // full|incremental
	PrevChangeID string `json:"prevChangeId,omitempty"` // incremental base
	Connections  int    `json:"connections"`
	// BandwidthBytesPerSec is the job's bandwidth limit (BackupInput.Bandwidth), shared by
	// every disk of the job (the SNA keys it by workflow ID); 0: none. The site's limit
	// (DISKFERRY_SITE_BANDWIDTH) applies as well: the stricter wins.
	BandwidthBytesPerSec int64 `json:"bandwidthBytesPerSec,omitempty"`
}

// CopyWaitSignal is the signal a copy (CopyDisk, WriteDisk) sends its run when it starts
// waiting on the SNA for a copy slot, and again once it runs, so the run's job log (the Web
// UI's Current Details) says what the copy waits for; the heartbeat says it to queries.
const CopyWaitSignal = "copy-wait"

// CopyWait is CopyWaitSignal's payload: the disk and what its copy waits for, empty once it
// runs.
type CopyWait struct {
	DiskKey    int32  `json:"diskKey"`
	WaitingFor string `json:"waitingFor,omitempty"`
}

// CopyProgress is heartbeated by CopyDisk; a retried attempt resumes from Checkpoint.
type CopyProgress struct {
	Checkpoint   int64  `json:"checkpoint"` // every byte below is written and flushed on the target
	BytesDone    int64  `json:"bytesDone"`
	BytesTotal   int64  `json:"bytesTotal"`
	BytesRead    int64  `json:"bytesRead"`
	BytesWritten int64  `json:"bytesWritten"`
	BytesZeroed  int64  `json:"bytesZeroed"`
	DigestState  []byte `json:"digestState,omitempty"` // digest of the areas below Checkpoint
	// Ahead are stretches beyond Checkpoint already written and flushed (the copy works up
	// to 512 MiB ahead of it); a retried attempt does not redo them.
	Ahead []CopyStretch `json:"ahead,omitempty"`
	// WaitingFor says what the copy waits for before it starts, e.g. "a copy slot on the SNA
	// of site S" while the SNA runs DISKFERRY_MAX_COPIES copies already; empty once it runs.
	WaitingFor string `json:"waitingFor,omitempty"`
}

// CopyStretch is a finished stretch beyond a copy's checkpoint.
type CopyStretch struct {
	Start  int64  `json:"start"`
	Length int64  `json:"length"`
	Sums   []byte `json:"sums,omitempty"` // SHA-256 of each block, 32 bytes each
}

// CopyDiskResult is what CopyDisk returns.
type CopyDiskResult struct {
	DiskKey       int32         `json:"diskKey"`
	BytesRead     int64         `json:"bytesRead"`
	BytesWritten  int64         `json:"bytesWritten"`
	BytesZeroed   int64         `json:"bytesZeroed"`
	BytesRecopied int64         `json:"bytesRecopied"` // redone after a resume
	Duration      time.Duration `json:"duration"`
	BlockSize     int64         `json:"blockSize"`
	// Digest is SHA-256 over the SHA-256 of each piece of the copied areas (areas split at
	// BlockSize boundaries), in offset order; the hub recomputes it from the file.
	Digest string `json:"digest"`
	// Areas are the areas copied (CBT's changed or allocated areas); nil (null) means the
	// whole disk, empty means nothing. Not omitempty: an empty list must not become nil.
	Areas []Extent `json:"areas"`
}

// ReadChangeIDsInput asks for each disk's changeId inside the snapshot.
type ReadChangeIDsInput struct {
	Snapshot Snapshot `json:"snapshot"`
}

// DiskResult is one disk of a committed point.
type DiskResult struct {
	Key           int32         `json:"key"`
	Path          string        `json:"path"`
	ParentPath    string        `json:"parentPath,omitempty"`
	Mode          string        `json:"mode"`
	ChangeID      string        `json:"changeId"`
	CapacityBytes int64         `json:"capacityBytes"`
	BytesRead     int64         `json:"bytesRead"`
	BytesWritten  int64         `json:"bytesWritten"`
	BytesZeroed   int64         `json:"bytesZeroed"`
	Duration      time.Duration `json:"duration"`
	Digest        string        `json:"digest"`
	Reason        string        `json:"reason,omitempty"` // why the disk was copied in full
	// AllocatedBytes is what the file takes on the hub, from its verification; 0 in
	// histories from before it was recorded.
	AllocatedBytes int64 `json:"allocatedBytes,omitempty"`
}

// CommitPointInput marks a point complete; only then is it usable.
type CommitPointInput struct {
	PointID string       `json:"pointId"`
	Disks   []DiskResult `json:"disks"`
}

// FailPointInput marks a point failed with the error.
type FailPointInput struct {
	PointID string `json:"pointId"`
	Error   string `json:"error"`
}
