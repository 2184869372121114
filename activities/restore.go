package activities

import "time"

// Restore activities: RestoreWorkflow and MountWorkflow give restore points back. They
// reuse the backup's AllocatePort, ReleasePorts, StartExport (ReadOnly), StopExport,
// EnsureTunnel, DropTunnel and InspectVM; each comment gives the input → result.
const (
	// hub, on HubQueue
	ResolvePointName        = "ResolvePoint"        // ResolvePointInput → RestoreSource
	MarkRestoredInPlaceName = "MarkRestoredInPlace" // MarkRestoredInPlaceInput → nothing

	// hub host, on HubHostQueue(hubID)
	RestoreFileName = "RestoreFile" // RestoreFileInput → RestoreFileResult; heartbeats RestoreFileProgress

	// sna, on SNAQueue(site)
	CreateRestoreVMName  = "CreateRestoreVM"  // CreateRestoreVMInput → RestoreVM
	DestroyRestoreVMName = "DestroyRestoreVM" // DestroyRestoreVMInput → nothing
	SetPowerName         = "SetPower"         // SetPowerInput → nothing
	WriteDiskName        = "WriteDisk"        // WriteDiskInput → WriteDiskResult; heartbeats CopyProgress
	ReadBackDiskName     = "ReadBackDisk"     // ReadBackDiskInput → ReadBackResult; heartbeats CopyProgress
)

// Error types of restores (non-retryable, like the backup's).
const (
	// ErrPoweredOn: an in-place restore was asked for a VM that is powered on, without
	// permission to power it off.
	ErrPoweredOn = "PoweredOn"
	// ErrMismatch: a restored disk read back from vCenter differs from the point.
	ErrMismatch = "Mismatch"
)

// Restore destinations.
const (
	DestinationNewVM   = "new-vm"
	DestinationInPlace = "in-place"
	DestinationFile    = "file"
)

// File restore formats.
const (
	FormatRaw   = "raw"
	FormatQCOW2 = "qcow2" // standalone: no backing chain
	FormatVMDK  = "vmdk"  // streamOptimized, importable into vSphere
)

// ResolvePointInput names the point to restore: PointID, or the latest complete point of
// VM (its name or moref, as the catalog knows it: inventory paths are not kept) when PointID
// is empty. Both given: the point must be of that VM.
type ResolvePointInput struct {
	PointID string  `json:"pointId,omitempty"`
	VM      string  `json:"vm,omitempty"`
	Disks   []int32 `json:"disks,omitempty"` // empty: every disk of the point
}

// RestoreSource is a complete point, ready to be restored: the disks asked for, each with
// the qcow2 that is the top of its backing chain on the point's hub.
type RestoreSource struct {
	PointID      string       `json:"pointId"`
	HubID        string       `json:"hubId"`
	Site         string       `json:"site"` // the site the point was backed up from
	VMName       string       `json:"vmName"`
	VMMoref      string       `json:"vmMoref"`
	InstanceUUID string       `json:"instanceUuid"` // the vCenter the VM lives in
	Mode         string       `json:"mode"`
	FinishedAt   time.Time    `json:"finishedAt"`
	Config       *VMConfig    `json:"config,omitempty"` // nil: not captured (older points)
	Disks        []SourceDisk `json:"disks"`
}

// SourceDisk is one disk of a point to restore.
type SourceDisk struct {
	Key           int32  `json:"key"`
	CapacityBytes int64  `json:"capacityBytes"`
	Path          string `json:"path"`  // the point's qcow2 of the disk (its chain below it)
	Chain         int    `json:"chain"` // files in the backing chain, this one included
}

// MarkRestoredInPlaceInput records that a VM's disks were overwritten from a point (or
// partly, when the restore failed): its CBT chain no longer describes what our points hold,
// so its next backup is full, with the reason recorded.
type MarkRestoredInPlaceInput struct {
	InstanceUUID string `json:"instanceUuid"`
	VMMoref      string `json:"vmMoref"`
	Reason       string `json:"reason"`
}

// RestoreFileInput writes one disk of a point to a file on the hub. The file must not
// exist; it appears complete or not at all.
type RestoreFileInput struct {
	Path   string `json:"path"`   // the point's qcow2 of the disk
	Format string `json:"format"` // raw|qcow2|vmdk
	Output string `json:"output"` // absolute path on the hub
}

// RestoreFileProgress is what RestoreFile heartbeats: the percentage of its current phase.
type RestoreFileProgress struct {
	Percent float64 `json:"percent"`
	Phase   string  `json:"phase,omitempty"` // RestoreFilePhaseConvert, then RestoreFilePhaseCompare
}

// RestoreFile's phases: the point is written to the file, then the file compared with it.
const (
	RestoreFilePhaseConvert = "convert"
	RestoreFilePhaseCompare = "compare"
)

// RestoreFileResult says what was written; the file was compared with the point.
type RestoreFileResult struct {
	Output         string `json:"output"`
	Format         string `json:"format"`
	VirtualBytes   int64  `json:"virtualBytes"`
	AllocatedBytes int64  `json:"allocatedBytes"` // of the output file
}

// RestoreVMSpec says where a new VM goes; empty fields take the source VM's placement
// (looked up by SourceVMMoref) or vCenter's defaults.
type RestoreVMSpec struct {
	Name         string    `json:"name"`
	Folder       string    `json:"folder,omitempty"`       // inventory path
	ResourcePool string    `json:"resourcePool,omitempty"` // inventory path
	Host         string    `json:"host,omitempty"`         // inventory path
	Datastore    string    `json:"datastore,omitempty"`    // name
	Config       *VMConfig `json:"config"`
	// SourceVMMoref is the backed-up VM, for the default placement; it may be gone.
	SourceVMMoref string `json:"sourceVmMoref,omitempty"`
}

// CreateRestoreVMInput creates a powered-off VM of the point's shape, marked as made by
// the workflow (its annotation), so a retry finds it and the undo removes only it. A VM of
// that name not made by this workflow is ErrBadInput naming the field.
type CreateRestoreVMInput struct {
	WorkflowID string        `json:"workflowId"`
	Spec       RestoreVMSpec `json:"spec"`
}

// RestoreVM is the VM a restore writes into.
type RestoreVM struct {
	Moref string `json:"moref"`
	Name  string `json:"name"`
	// Disks maps the point's disk keys to the VM's disks (new keys for a new VM).
	Disks []RestoreDiskMap `json:"disks"`
}

// RestoreDiskMap pairs a point's disk with the VM disk it is restored into.
type RestoreDiskMap struct {
	PointKey      int32  `json:"pointKey"`
	VMKey         int32  `json:"vmKey"`
	CapacityBytes int64  `json:"capacityBytes"`
	BackingFile   string `json:"backingFile"` // "[datastore] dir/name.vmdk"
}

// DestroyRestoreVMInput removes a VM CreateRestoreVM made for the workflow; a VM by that
// name without the workflow's mark, and a VM already gone, are left alone.
type DestroyRestoreVMInput struct {
	WorkflowID string `json:"workflowId"`
	Name       string `json:"name"`
	Moref      string `json:"moref,omitempty"` // empty when the create's reply was lost
}

// Power states for SetPower.
const (
	PowerOn  = "poweredOn"
	PowerOff = "poweredOff"
)

// SetPowerInput powers a VM on or off; already in that state is success.
type SetPowerInput struct {
	VMMoref string `json:"vmMoref"`
	State   string `json:"state"` // poweredOn|poweredOff
}

// WriteDiskInput copies a point's disk from its read-only hub export (through the tunnel)
// into a VM disk. The VM must be powered off. Heartbeats CopyProgress; a retried attempt
// resumes from its checkpoint where the transport allows (vddk), else starts over.
type WriteDiskInput struct {
	HubID         string `json:"hubId"`
	SourcePort    int    `json:"sourcePort"`   // the export's port lease
	SourceSocket  string `json:"sourceSocket"` // Export.Socket, on the hub
	ExportName    string `json:"exportName"`
	VMMoref       string `json:"vmMoref"`
	DiskKey       int32  `json:"diskKey"` // the VM's disk
	CapacityBytes int64  `json:"capacityBytes"`
	Connections   int    `json:"connections"`
	// BandwidthBytesPerSec is the job's bandwidth limit (RestoreInput.Bandwidth), shared by
	// every disk of the job as CopyDiskInput's; 0: none. The site's limit applies as well.
	BandwidthBytesPerSec int64 `json:"bandwidthBytesPerSec,omitempty"`
}

// WriteDiskResult is what WriteDisk did. Digest is over the whole disk as read from the
// export (blockcopy's digest: SHA-256 over the SHA-256 of each BlockSize piece).
type WriteDiskResult struct {
	DiskKey       int32         `json:"diskKey"`
	BytesRead     int64         `json:"bytesRead"`
	BytesWritten  int64         `json:"bytesWritten"`
	BytesZeroed   int64         `json:"bytesZeroed"`
	BytesRecopied int64         `json:"bytesRecopied"`
	Duration      time.Duration `json:"duration"`
	BlockSize     int64         `json:"blockSize"`
	Digest        string        `json:"digest"`
}

// ReadBackDiskInput reads a VM disk back from vCenter and compares it with the digest of
// what was written; a difference is ErrMismatch.
type ReadBackDiskInput struct {
	VMMoref   string `json:"vmMoref"`
	DiskKey   int32  `json:"diskKey"`
	BlockSize int64  `json:"blockSize"`
	Digest    string `json:"digest"` // WriteDiskResult.Digest
}

// ReadBackResult is the read-back's outcome (only returned when it matched).
type ReadBackResult struct {
	DiskKey   int32         `json:"diskKey"`
	BytesRead int64         `json:"bytesRead"`
	Duration  time.Duration `json:"duration"`
}
