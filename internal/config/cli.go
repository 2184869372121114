package config

import (
	"fmt"
	"log/slog"
)

// CLI configures the diskferry command (starter/).
type CLI struct {
	Temporal

	// DISKFERRY_DB_DSN is the catalog's MySQL DSN, for commands that query restore points.
	// Optional. Secret: or DISKFERRY_DB_DSN_FILE.
	DBDSN Secret `envconfig:"DISKFERRY_DB_DSN"`
	// DISKFERRY_DB_DSN_FILE is a file holding DISKFERRY_DB_DSN.
	DBDSNFile string `envconfig:"DISKFERRY_DB_DSN_FILE"`
	// DISKFERRY_LOG_LEVEL is debug, info, warn or error. Default warn: a command prints its
	// results, not its progress.
	LogLevel slog.Level `envconfig:"DISKFERRY_LOG_LEVEL" default:"warn"`
}

// LoadCLI reads the command's configuration from the environment and validates it.
func LoadCLI() (CLI, error) {
	var c CLI
	if err := process(&c); err != nil {
		return CLI{}, fmt.Errorf("cli configuration: %w", err)
	}
	var v validator
	v.secret("DISKFERRY_DB_DSN", &c.DBDSN, c.DBDSNFile)
	c.Temporal.validate(&v)
	if err := v.err("cli"); err != nil {
		return CLI{}, err
	}
	return c, nil
}

// LogValue shows the configuration in logs with secrets redacted.
func (c CLI) LogValue() slog.Value { return logValue(c) }

// String shows the configuration as NAME=value pairs with secrets redacted.
func (c CLI) String() string { return render(c) }
