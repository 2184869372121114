package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/operatorservice/v1"
	"google.golang.org/grpc"
)

// fakeOperator keeps a namespace's custom search attributes; other calls are not used.
type fakeOperator struct {
	operatorservice.OperatorServiceClient
	attrs map[string]enumspb.IndexedValueType
	adds  int
}

func (f *fakeOperator) ListSearchAttributes(context.Context, *operatorservice.ListSearchAttributesRequest, ...grpc.CallOption) (*operatorservice.ListSearchAttributesResponse, error) {
	return &operatorservice.ListSearchAttributesResponse{CustomAttributes: f.attrs}, nil
}

func (f *fakeOperator) AddSearchAttributes(_ context.Context, req *operatorservice.AddSearchAttributesRequest, _ ...grpc.CallOption) (*operatorservice.AddSearchAttributesResponse, error) {
	f.adds++
	for name, typ := range req.GetSearchAttributes() {
		f.attrs[name] = typ
	}
	return &operatorservice.AddSearchAttributesResponse{}, nil
}

var keyword = map[string]enumspb.IndexedValueType{"VMName": enumspb.INDEXED_VALUE_TYPE_KEYWORD, "Site": enumspb.INDEXED_VALUE_TYPE_KEYWORD}

func TestEnsureSearchAttributesAddsOnlyMissing(t *testing.T) {
	ops := &fakeOperator{attrs: map[string]enumspb.IndexedValueType{"Site": enumspb.INDEXED_VALUE_TYPE_KEYWORD}}
	added, err := ensureSearchAttributes(context.Background(), ops, "default", keyword)
	require.NoError(t, err)
	require.Equal(t, []string{"VMName"}, added)

	added, err = ensureSearchAttributes(context.Background(), ops, "default", keyword)
	require.NoError(t, err)
	require.Empty(t, added, "already registered is fine")
	require.Equal(t, 1, ops.adds)
}

func TestEnsureSearchAttributesRefusesWrongType(t *testing.T) {
	ops := &fakeOperator{attrs: map[string]enumspb.IndexedValueType{"VMName": enumspb.INDEXED_VALUE_TYPE_TEXT}}
	_, err := ensureSearchAttributes(context.Background(), ops, "default", keyword)
	require.ErrorIs(t, err, errWrongType)
	require.ErrorContains(t, err, "VMName is Text, diskferry needs Keyword")
	require.Zero(t, ops.adds, "nothing is added next to a wrong type")
}
