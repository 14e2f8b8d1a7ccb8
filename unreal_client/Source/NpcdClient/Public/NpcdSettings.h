#pragma once

#include "CoreMinimal.h"
#include "Engine/DeveloperSettings.h"
#include "NpcdSettings.generated.h"

/** Project Settings > Plugins > npcd. */
UCLASS(Config = Game, DefaultConfig, meta = (DisplayName = "npcd"))
class NPCDCLIENT_API UNpcdSettings : public UDeveloperSettings
{
    GENERATED_BODY()

public:
    /** host:port of the npcd daemon. */
    UPROPERTY(Config, EditAnywhere, Category = "Connection")
    FString Address = TEXT("127.0.0.1:50051");

    UPROPERTY(Config, EditAnywhere, Category = "Connection", meta = (ClampMin = "10"))
    int32 InitialBackoffMs = 250;

    UPROPERTY(Config, EditAnywhere, Category = "Connection", meta = (ClampMin = "10"))
    int32 MaxBackoffMs = 5000;

    /** The daemon's bearer token (npcd.yaml `token`); empty: none. Sent as "authorization: Bearer <token>".
     *  Prefer the NPCD_TOKEN environment variable (read when this is empty) over a token in a shipped config. */
    UPROPERTY(Config, EditAnywhere, Category = "Security")
    FString Token;

    /** TLS instead of plaintext (required for a daemon that is not on this machine). */
    UPROPERTY(Config, EditAnywhere, Category = "Security")
    bool bUseTls = false;

    /** TLS: a PEM file of the root certificates the daemon's certificate is checked against; empty: the system's. */
    UPROPERTY(Config, EditAnywhere, Category = "Security", meta = (EditCondition = "bUseTls"))
    FString RootCertsPemPath;

    /** Mutual TLS: the client's certificate chain and private key (PEM files), both or neither. */
    UPROPERTY(Config, EditAnywhere, Category = "Security", meta = (EditCondition = "bUseTls"))
    FString ClientCertPemPath;

    UPROPERTY(Config, EditAnywhere, Category = "Security", meta = (EditCondition = "bUseTls"))
    FString ClientKeyPemPath;

    /** TLS: the name in the daemon's certificate when it differs from the address's host. */
    UPROPERTY(Config, EditAnywhere, Category = "Security", meta = (EditCondition = "bUseTls"))
    FString TlsServerName;
};
