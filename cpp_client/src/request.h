// The request builder behind the opaque npcd_request handle.
#pragma once

#include "npcd/v1/npcd.pb.h"

struct npcd_request {
    npcd::v1::SayRequest message;
};
