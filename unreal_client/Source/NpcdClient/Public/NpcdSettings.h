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
};
