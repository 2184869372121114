package workflows

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.temporal.io/sdk/temporal"

	"github.com/diskferry/diskferry/activities"
	"github.com/diskferry/diskferry/internal/limits"
	"github.com/diskferry/diskferry/internal/text"
)

// UnmarshalJSON decodes the input leniently and remembers whether a strict decoding would
// have refused it (see BackupInput.UnmarshalJSON).
func (in *RestoreInput) UnmarshalJSON(data []byte) error {
	type plain RestoreInput
	var lenient plain
	unknown, err := decodeStrict(data, &lenient)
	if err != nil {
		return err
	}
	*in = RestoreInput(lenient)
	in.unknown = unknown
	return nil
}

// UnmarshalJSON decodes the input leniently and remembers whether a strict decoding would
// have refused it (see BackupInput.UnmarshalJSON).
func (in *MountInput) UnmarshalJSON(data []byte) error {
	type plain MountInput
	var lenient plain
	unknown, err := decodeStrict(data, &lenient)
	if err != nil {
		return err
	}
	*in = MountInput(lenient)
	in.unknown = unknown
	return nil
}

// decodeStrict decodes data into v leniently; unknown is what a strict decoding said.
func decodeStrict[T any](data []byte, v *T) (unknown, err error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var strict T
	unknown = dec.Decode(&strict)
	return unknown, json.Unmarshal(data, v)
}

// pointIDShape is what a point ID looks like: path-safe, as the catalog makes them.
var pointIDShape = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// MaxVMNameLength is vSphere's limit on a VM's name, in characters.
const MaxVMNameLength = 80

// MaxOutputLength bounds a file restore's output path, in bytes (PATH_MAX).
const MaxOutputLength = 4096

func badRestoreInput(msg string) error {
	return temporal.NewNonRetryableApplicationError("invalid restore input: "+msg, activities.ErrBadInput, nil)
}

func badMountInput(msg string) error {
	return temporal.NewNonRetryableApplicationError("invalid mount input: "+msg, activities.ErrBadInput, nil)
}

// validatePointRef checks that exactly one of point and vm names what to restore.
func validatePointRef(point, vm string, bad func(string) error) error {
	switch {
	case point == "" && vm == "":
		return bad("point: required (or vm, for the VM's latest complete point)")
	case point != "" && vm != "":
		return bad("point, vm: give one of them, not both")
	case point != "" && !pointIDShape.MatchString(point):
		return bad(fmt.Sprintf("point: %q is not a point ID (letters, digits, '.', '_', '-'; at most 64)", text.Shorten(point, 80)))
	case vm != "":
		return validateVMRef(vm, bad)
	}
	return nil
}

func validateDiskKeys(keys []int32, bad func(string) error) error {
	seen := make(map[int32]bool, len(keys))
	for _, key := range keys {
		if seen[key] {
			return bad(fmt.Sprintf("disks: key %d listed twice", key))
		}
		seen[key] = true
	}
	return nil
}

func validateSite(site string, bad func(string) error) error {
	if site != "" && !siteName.MatchString(site) {
		return bad(fmt.Sprintf("site: %q is not a valid site name (letters, digits, '.', '_', '-'; at most 63)", text.Shorten(site, 80)))
	}
	return nil
}

// validateBandwidth accepts a job's bandwidth limit as limits.ParseRate reads it; empty is none.
func validateBandwidth(bandwidth string, bad func(string) error) error {
	if _, err := limits.ParseRate(bandwidth); err != nil {
		return bad(fmt.Sprintf("bandwidth: %s", text.Shorten(err.Error(), 120)))
	}
	return nil
}

// bandwidthBytesPerSec is a validated job limit in bytes per second; 0: none.
func bandwidthBytesPerSec(bandwidth string) int64 {
	n, _ := limits.ParseRate(bandwidth)
	return n
}

func validateWorkerWait(seconds int, bad func(string) error) error {
	if seconds < 0 || seconds > int(MaxWorkerWait/time.Second) {
		return bad(fmt.Sprintf("workerWaitSeconds: %d is outside 0..%d", seconds, int(MaxWorkerWait/time.Second)))
	}
	return nil
}

// validateVMName accepts a name vSphere keeps as given: no path separators, no '%' (vSphere
// escapes those), no control characters, at most MaxVMNameLength characters.
func validateVMName(field, name string) error {
	switch {
	case !utf8.ValidString(name):
		return badRestoreInput(field + ": not valid UTF-8")
	case utf8.RuneCountInString(name) > MaxVMNameLength:
		return badRestoreInput(fmt.Sprintf("%s: %q is longer than %d characters", field, text.Shorten(name, 100), MaxVMNameLength))
	case strings.TrimSpace(name) != name:
		return badRestoreInput(fmt.Sprintf("%s: %q has leading or trailing spaces", field, name))
	case strings.ContainsFunc(name, unicode.IsControl) || strings.ContainsAny(name, `/\%`):
		return badRestoreInput(fmt.Sprintf("%s: %q contains '/', '\\', '%%' or control characters", field, name))
	}
	return nil
}

// validateInventoryPath accepts an absolute inventory path (/datacenter/host/cluster/...).
func validateInventoryPath(field, p string) error {
	switch {
	case p == "":
		return nil
	case len(p) > MaxVMRefLength:
		return badRestoreInput(fmt.Sprintf("%s: %d bytes long, at most %d", field, len(p), MaxVMRefLength))
	case !utf8.ValidString(p) || strings.ContainsFunc(p, unicode.IsControl):
		return badRestoreInput(fmt.Sprintf("%s: %q is not valid UTF-8 or contains control characters", field, text.Shorten(p, 80)))
	case !strings.HasPrefix(p, "/"):
		return badRestoreInput(fmt.Sprintf("%s: %q is not an absolute inventory path (/datacenter/...)", field, p))
	}
	for _, elem := range strings.Split(p[1:], "/") {
		if elem == "" || elem == "." || elem == ".." {
			return badRestoreInput(fmt.Sprintf("%s: inventory path %q has an empty, '.' or '..' element", field, p))
		}
	}
	return nil
}

// Validate checks the input and returns a non-retryable ErrBadInput error naming the field.
func (in RestoreInput) Validate() error {
	if in.unknown != nil {
		return badRestoreInput(fmt.Sprintf("%v (known fields: point, vm, destination, disks, site, name, folder, resourcePool, host, datastore, powerOn, powerOff, format, output, connections, workerWaitSeconds, bandwidth)", in.unknown))
	}
	if err := validatePointRef(in.Point, in.VM, badRestoreInput); err != nil {
		return err
	}
	dest := in.Destination
	switch dest {
	case "":
		dest = activities.DestinationNewVM
	case activities.DestinationNewVM, activities.DestinationInPlace, activities.DestinationFile:
	default:
		return badRestoreInput(fmt.Sprintf("destination: %q is not one of new-vm, in-place, file", text.Shorten(dest, 80)))
	}
	if err := validateDiskKeys(in.Disks, badRestoreInput); err != nil {
		return err
	}
	if err := validateSite(in.Site, badRestoreInput); err != nil {
		return err
	}
	// Fields of another destination are refused rather than ignored: a restore that silently
	// dropped --power-off or --output would not do what the operator asked.
	only := func(field string, set bool, allowed ...string) error {
		for _, a := range allowed {
			if dest == a {
				return nil
			}
		}
		if set {
			return badRestoreInput(fmt.Sprintf("%s: only for destination %s, not %s", field, strings.Join(allowed, " or "), dest))
		}
		return nil
	}
	for _, c := range []struct {
		field   string
		set     bool
		allowed []string
	}{
		{"name", in.Name != "", []string{activities.DestinationNewVM}},
		{"folder", in.Folder != "", []string{activities.DestinationNewVM}},
		{"resourcePool", in.ResourcePool != "", []string{activities.DestinationNewVM}},
		{"host", in.Host != "", []string{activities.DestinationNewVM}},
		{"datastore", in.Datastore != "", []string{activities.DestinationNewVM}},
		{"powerOn", in.PowerOn, []string{activities.DestinationNewVM, activities.DestinationInPlace}},
		{"powerOff", in.PowerOff, []string{activities.DestinationInPlace}},
		{"site", in.Site != "", []string{activities.DestinationNewVM, activities.DestinationInPlace}},
		{"connections", in.Connections != 0, []string{activities.DestinationNewVM, activities.DestinationInPlace}},
		{"bandwidth", in.Bandwidth != "", []string{activities.DestinationNewVM, activities.DestinationInPlace}},
		{"format", in.Format != "", []string{activities.DestinationFile}},
		{"output", in.Output != "", []string{activities.DestinationFile}},
	} {
		if err := only(c.field, c.set, c.allowed...); err != nil {
			return err
		}
	}
	if in.Name != "" {
		if err := validateVMName("name", in.Name); err != nil {
			return err
		}
	}
	for _, p := range []struct{ field, value string }{{"folder", in.Folder}, {"resourcePool", in.ResourcePool}, {"host", in.Host}} {
		if err := validateInventoryPath(p.field, p.value); err != nil {
			return err
		}
	}
	if in.Datastore != "" {
		if err := validateVMName("datastore", in.Datastore); err != nil {
			return err
		}
	}
	if dest == activities.DestinationFile {
		switch in.Format {
		case "":
			return badRestoreInput("format: required for a file restore (raw, qcow2 or vmdk)")
		case activities.FormatRaw, activities.FormatQCOW2, activities.FormatVMDK:
		default:
			return badRestoreInput(fmt.Sprintf("format: %q is not one of raw, qcow2, vmdk", text.Shorten(in.Format, 80)))
		}
		switch {
		case in.Output == "":
			return badRestoreInput("output: required for a file restore (an absolute path on the hub)")
		case len(in.Output) > MaxOutputLength:
			return badRestoreInput(fmt.Sprintf("output: %d bytes long, at most %d", len(in.Output), MaxOutputLength))
		case !utf8.ValidString(in.Output) || strings.ContainsFunc(in.Output, unicode.IsControl):
			return badRestoreInput(fmt.Sprintf("output: %q is not valid UTF-8 or contains control characters", text.Shorten(in.Output, 80)))
		case !path.IsAbs(in.Output) || path.Clean(in.Output) != in.Output || in.Output == "/":
			return badRestoreInput(fmt.Sprintf("output: %q is not a clean absolute path on the hub", text.Shorten(in.Output, 200)))
		}
	}
	if in.Connections < 0 || in.Connections > MaxConnections {
		return badRestoreInput(fmt.Sprintf("connections: %d is outside 0..%d", in.Connections, MaxConnections))
	}
	if err := validateBandwidth(in.Bandwidth, badRestoreInput); err != nil {
		return err
	}
	return validateWorkerWait(in.WorkerWaitSeconds, badRestoreInput)
}

// withDefaults fills the optional fields that need no restore point.
func (in RestoreInput) withDefaults() RestoreInput {
	if in.Destination == "" {
		in.Destination = activities.DestinationNewVM
	}
	if in.Connections == 0 {
		in.Connections = DefaultConnections
	}
	return in
}

// Validate checks the input and returns a non-retryable ErrBadInput error naming the field.
func (in MountInput) Validate() error {
	if in.unknown != nil {
		return badMountInput(fmt.Sprintf("%v (known fields: point, vm, disks, ttlSeconds, site, workerWaitSeconds)", in.unknown))
	}
	if err := validatePointRef(in.Point, in.VM, badMountInput); err != nil {
		return err
	}
	if err := validateDiskKeys(in.Disks, badMountInput); err != nil {
		return err
	}
	if err := validateSite(in.Site, badMountInput); err != nil {
		return err
	}
	if max := int(MaxMountTTL / time.Second); in.TTLSeconds < 0 || in.TTLSeconds > max {
		return badMountInput(fmt.Sprintf("ttlSeconds: %d is outside 0..%d (7 days)", in.TTLSeconds, max))
	}
	return validateWorkerWait(in.WorkerWaitSeconds, badMountInput)
}

// ttl is how long the mount lasts without an unmount.
func (in MountInput) ttl() time.Duration {
	if in.TTLSeconds == 0 {
		return DefaultMountTTL
	}
	return time.Duration(in.TTLSeconds) * time.Second
}
