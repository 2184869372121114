package activities

// Retention activities: RetentionWorkflow keeps what a VM's policy says and no more. Each
// comment gives the input → result.
const (
	// hub, on HubQueue
	PlanRetentionName = "PlanRetention" // PlanRetentionInput → RetentionPlan

	// hub host, on HubHostQueue(plan.HubID)
	ApplyRetentionName = "ApplyRetention" // ApplyRetentionInput → RetentionResult; heartbeats RetentionProgress
)

// ErrBusy: the VM's chain is in use (a backup, restore, mount or another retention of the
// VM runs); retention waits for the next run instead of racing it.
const ErrBusy = "Busy"

// RetentionPolicy is what a VM keeps. Zero counts are unused; all zero keeps everything.
// The newest complete point is always kept.
type RetentionPolicy struct {
	KeepLast int `json:"keepLast,omitempty"` // the newest N points
	// GFS: the newest point of each of the last N days / ISO weeks / months / years that
	// have points (UTC).
	Daily   int `json:"daily,omitempty"`
	Weekly  int `json:"weekly,omitempty"`
	Monthly int `json:"monthly,omitempty"`
	Yearly  int `json:"yearly,omitempty"`
	// MaxChain: after K incrementals a point is made full (its chain flattened into it), so
	// no restore reads through more than K+1 files. 0: unbounded.
	MaxChain int `json:"maxChain,omitempty"`
}

// PlanRetentionInput names the VM (catalog name or moref) whose points retention reviews.
type PlanRetentionInput struct {
	VM string `json:"vm"`
	// Delete are points the operator deletes on top of the policy (diskferry points delete).
	Delete []string `json:"delete,omitempty"`
	// ScheduleID is the schedule whose default policy applies when the VM has none of its own.
	ScheduleID string `json:"scheduleId,omitempty"`
}

// PointDecision is one point's fate and why.
type PointDecision struct {
	PointID string   `json:"pointId"`
	Keep    bool     `json:"keep"`
	Reasons []string `json:"reasons"`           // "last 3", "daily 2026-12-01", "deleted by operator", "not kept by the policy"
	Bytes   int64    `json:"bytes"`             // allocated bytes of the point's files
	Flatten bool     `json:"flatten,omitempty"` // made full to bound the chain (MaxChain)
}

// RetentionPlan is what PlanRetention decided. It changes nothing.
type RetentionPlan struct {
	VMID   int64           `json:"vmId"`
	VMName string          `json:"vmName"`
	HubID  string          `json:"hubId"`
	Policy RetentionPolicy `json:"policy"`
	// PolicySource says where the policy came from: "vm", "schedule <id>" or "none".
	PolicySource string          `json:"policySource"`
	Points       []PointDecision `json:"points"` // oldest first, every complete point of the VM
}

// ApplyRetentionInput carries out a plan on the hub holding the chain: every point not kept
// is marked deleting in the catalog (never restorable again) before its files are touched,
// then removed or merged into its neighbours; points marked Flatten are made full. Every
// step is idempotent: a retry after a crash finishes the job with every kept point intact.
type ApplyRetentionInput struct {
	Plan RetentionPlan `json:"plan"`
}

// RetentionProgress is what ApplyRetention heartbeats.
type RetentionProgress struct {
	Step    string  `json:"step"` // e.g. "commit disk 2000 of point P into point Q"
	Done    int     `json:"done"` // steps finished
	Total   int     `json:"total"`
	Percent float64 `json:"percent"` // of the running qemu-img
}

// RetentionResult says what ApplyRetention did.
type RetentionResult struct {
	Deleted    []string `json:"deleted"`   // points gone from the repository and catalog
	Flattened  []string `json:"flattened"` // points made full
	BytesFreed int64    `json:"bytesFreed"`
}
