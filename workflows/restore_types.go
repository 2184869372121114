package workflows

import "time"

// Registered names of the restore workflows, their signal and the ID conventions.
const (
	RestoreWorkflowName = "RestoreWorkflow"
	MountWorkflowName   = "MountWorkflow"
	// UnmountSignalName ends a MountWorkflow (diskferry unmount); a cancel does too.
	UnmountSignalName = "unmount"
	// MountQueryName returns a MountWorkflow's MountInfo (its URIs once they serve).
	MountQueryName = "mount"
)

// RestoreWorkflowID is the ID the CLI starts a restore under: one per destination object,
// so the server refuses a second restore into the same new VM name, VM or output file.
func RestoreWorkflowID(destination, target string) string {
	return "restore-" + destination + "-" + target
}

// MountWorkflowID is the ID of the mount of a point: one live mount per point.
func MountWorkflowID(pointID string) string { return "mount-" + pointID }

// RestoreInput is the plain-JSON request of a restore; it never carries a secret.
type RestoreInput struct {
	// Point is the restore point's ID; when empty, VM selects its latest complete point.
	Point string `json:"point,omitempty"`
	VM    string `json:"vm,omitempty"`
	// Destination is new-vm (default), in-place or file.
	Destination string  `json:"destination,omitempty"`
	Disks       []int32 `json:"disks,omitempty"` // the point's disk keys; empty: every disk
	// Site is the SNA that writes into vCenter (new-vm, in-place); default: the point's site.
	Site string `json:"site,omitempty"`

	// new-vm: the VM's name (default <vm>-restore-<point>) and placement (defaults: the
	// source VM's); PowerOn starts it once restored and verified.
	Name         string `json:"name,omitempty"`
	Folder       string `json:"folder,omitempty"`
	ResourcePool string `json:"resourcePool,omitempty"`
	Host         string `json:"host,omitempty"`
	Datastore    string `json:"datastore,omitempty"`
	PowerOn      bool   `json:"powerOn,omitempty"`

	// in-place: PowerOff allows powering the original VM off first (else a powered-on VM
	// is refused).
	PowerOff bool `json:"powerOff,omitempty"`

	// file: Format raw|qcow2|vmdk; Output is the file on the hub for one disk, or an
	// existing directory on the hub for several (files named disk-<key>.<format>).
	Format string `json:"format,omitempty"`
	Output string `json:"output,omitempty"`

	Connections       int `json:"connections,omitempty"`
	WorkerWaitSeconds int `json:"workerWaitSeconds,omitempty"`
	// Bandwidth limits the restore's disk writes together (new-vm, in-place), as a backup's
	// (BackupInput.Bandwidth); empty: no job limit. The SNA's DISKFERRY_SITE_BANDWIDTH
	// applies as well: the stricter wins.
	Bandwidth string `json:"bandwidth,omitempty"`

	unknown error
}

// RestoredDisk is one disk of a finished restore.
type RestoredDisk struct {
	PointKey     int32         `json:"pointKey"`
	VMKey        int32         `json:"vmKey,omitempty"`  // new-vm, in-place
	Output       string        `json:"output,omitempty"` // file
	BytesRead    int64         `json:"bytesRead"`
	BytesWritten int64         `json:"bytesWritten"`
	Duration     time.Duration `json:"duration"`
	Digest       string        `json:"digest,omitempty"` // of the whole disk, read back equal
}

// RestoreResult describes a finished restore.
type RestoreResult struct {
	PointID     string         `json:"pointId"`
	Destination string         `json:"destination"`
	VMName      string         `json:"vmName,omitempty"`  // the VM written (new or original)
	VMMoref     string         `json:"vmMoref,omitempty"` //
	Disks       []RestoredDisk `json:"disks"`
	Duration    time.Duration  `json:"duration"`
	Warnings    []string       `json:"warnings,omitempty"`
}

// MountInput asks for a read-only NBD export of a point until unmount, TTL or cancel.
type MountInput struct {
	Point string  `json:"point,omitempty"`
	VM    string  `json:"vm,omitempty"` // latest complete point of VM when Point is empty
	Disks []int32 `json:"disks,omitempty"`
	// TTLSeconds ends the mount on its own; 0: DefaultMountTTL.
	TTLSeconds int `json:"ttlSeconds,omitempty"`
	// Site, when set, also forwards the exports to that site's SNA through its tunnel.
	Site              string `json:"site,omitempty"`
	WorkerWaitSeconds int    `json:"workerWaitSeconds,omitempty"`

	unknown error
}

// Mount limits.
const (
	DefaultMountTTL = 2 * time.Hour
	MaxMountTTL     = 7 * 24 * time.Hour
)

// MountedDisk is one served disk of a mount.
type MountedDisk struct {
	Key  int32  `json:"key"`
	Port int    `json:"port"`
	URI  string `json:"uri"` // on the hub: nbd+unix:///disk-<key>?socket=...
	// SiteURI is the same export on the SNA, through the tunnel, when a site was given.
	SiteURI string `json:"siteUri,omitempty"`
}

// MountInfo is what the mount query returns and MountWorkflow's result.
type MountInfo struct {
	PointID string        `json:"pointId"`
	HubID   string        `json:"hubId"`
	Site    string        `json:"site,omitempty"`
	Status  string        `json:"status"` // preparing, mounted, unmounting, ended, failed
	Expires time.Time     `json:"expires,omitzero"`
	Disks   []MountedDisk `json:"disks"`
	Ended   string        `json:"ended,omitempty"` // why it ended: unmount, ttl, cancel, error
	Error   string        `json:"error,omitempty"`
}

// Mount statuses.
const (
	MountPreparing  = "preparing"
	MountMounted    = "mounted"
	MountUnmounting = "unmounting"
	MountEnded      = "ended"
	MountFailed     = "failed"
)
